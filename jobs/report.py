"""`edc-ray report` as a script, for `ray job submit -- python jobs/report.py ...`; the code is
edc_ray/commands/report.py.

    python jobs/report.py --help
"""
import sys

from edc_ray.commands.report import main

if __name__ == "__main__":
    sys.exit(main())
