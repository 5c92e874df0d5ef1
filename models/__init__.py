"""open_clip model construction, weight loading, preprocessing presets and export."""
