"""agecl: face age estimation with contrastive triplets (Chae et al., arXiv 2308.11896).

Modules, in the order data flows through them: format (the on-disk contract), datasets (raw
readers), align (MTCNN + five-point warp, offline only), synthetic, shards (the builder), reader,
sampler, loader, model, losses, train, evaluate, predict.
"""

__version__ = "0.1.0"
