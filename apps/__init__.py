"""Applications of the core: one folder per experiment (toy, molecule, flow, layout, t2i)."""
