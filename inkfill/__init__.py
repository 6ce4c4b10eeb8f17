"""inkfill: personalized data generation, filling empty (writer, label) cells of handwriting."""

__version__ = "0.1.0"
