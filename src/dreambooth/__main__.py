"""`python -m dreambooth` and `accelerate launch -m dreambooth` enter here."""

from dreambooth.cli import entry

if __name__ == "__main__":
    raise SystemExit(entry())
