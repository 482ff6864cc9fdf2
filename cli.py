"""Run the sqaudio command line from a checkout: `python cli.py --help`."""
from sqaudio.cli import main

if __name__ == "__main__":
    main()
