"""`edc-ray condense` as a script, for `ray job submit -- python jobs/condense.py ...`; the code is
edc_ray/commands/condense.py.

    python jobs/condense.py --help
"""
import sys

from edc_ray.commands.condense import main

if __name__ == "__main__":
    sys.exit(main())
