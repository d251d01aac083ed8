"""difflower.graph_passes: module- and artifact-level rewrites, each returning a PassResult."""
