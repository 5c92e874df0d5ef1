"""`run.py demo`: synthetic data and the four methods side by side, without downloads.

synthetic.py   image-caption pairs rendered locally (coloured shapes; half the captions partial)
experiment.py  pretrain a tiny CLIP, fine-tune it with each method and seed, print the table, plot
"""
