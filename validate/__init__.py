"""difflower.validate: see ../shared/DESIGN.md."""
