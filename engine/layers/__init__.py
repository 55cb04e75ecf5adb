"""Building blocks shared by the ERNIE models: linears with weight loaders, norms, rotary,
paged attention, mixture of experts."""
