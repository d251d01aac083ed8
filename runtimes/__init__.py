"""difflower.runtimes: see ../shared/DESIGN.md."""
