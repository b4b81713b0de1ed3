"""`edc-ray prepare` as a script, for `ray job submit -- python jobs/prepare.py ...`; the code is
edc_ray/commands/prepare.py.

    python jobs/prepare.py --help
"""
import sys

from edc_ray.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())
