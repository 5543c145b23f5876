"""Files to pixels: walking the tree, change detection, decoding."""
