"""difflower.exporters: one backend per file, each writing an artifact folder with difflower.json."""
