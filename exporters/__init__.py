"""difflower.exporters: see ../shared/DESIGN.md."""
