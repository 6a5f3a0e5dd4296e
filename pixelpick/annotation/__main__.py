"""`python -m pixelpick.annotation`: the same commands as `pixelpick annotate`, without the orchestration stack."""

from pixelpick.annotation.cli import main

if __name__ == "__main__":
    main()
