"""Training-only code (losses, data sources, DDP loop, export, evaluation helpers); not shipped in the zip."""
