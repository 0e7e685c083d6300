"""Entry point of `python -m annotate` (see annotate/pipeline.py)."""
from annotate.pipeline import main

if __name__ == "__main__":
    main()
