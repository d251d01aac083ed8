"""difflower.graph_passes: see ../shared/DESIGN.md."""
