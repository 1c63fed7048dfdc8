"""``python -m qanalyze``: the command line, as the ``qanalyze`` script runs it."""

from qanalyze.entry import entry_point

if __name__ == "__main__":
    entry_point()
