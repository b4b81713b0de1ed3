"""`edc-ray evaluate` as a script, for `ray job submit -- python jobs/evaluate.py ...`; the code is
edc_ray/commands/evaluate.py.

    python jobs/evaluate.py --help
"""
import sys

from edc_ray.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
