"""difflower.artifact: what exporters write and runtimes read, in one neutral place.

The artifact format sits between the stages that make it and the stages that use it: the
manifest (`difflower.json`), the component specs (tensor names, shapes, example inputs, the
wrapper modules every backend exports), each backend's on-disk format (file names, how a file
is loaded, name mangling), the precision type and the parity record. Exporters, graph passes,
runtimes and validate all import it; it imports only `difflower.reference`.
"""
