"""`curate train`: the loop (loop), its data (data), the memory estimate (memory) and
the SDXL model loading (sdxl)."""
