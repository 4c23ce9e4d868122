"""groupdir: a distributed Group-DIR trainer for deep imbalanced regression."""

__version__ = "0.2.0"
