"""`edc-ray report`: the report of a finished run folder (local or s3://), from its report.json.

    edc-ray report runs/demo                     # print report.md
    edc-ray report s3://bucket/runs/in1k-edc10 --write   # and write report.md and report.html there again

The report is rebuilt from report.json (and, for report.html, the run folder's shards), so a run folder
made by an older edc-ray gets today's layout.
"""
from __future__ import annotations

import sys

from edc_ray.cli import command_parser, run_job
from edc_ray.pipeline.report import markdown
from edc_ray.pipeline.report_page import write_html_report
from edc_ray.storage.run_folder import RunFolder


def show_report(run_dir: str, write: bool) -> str:
    """report.md's text for the run folder `run_dir`, written back into it when `write`."""
    run = RunFolder(run_dir)
    if not run.exists("report.json"):
        raise FileNotFoundError(f"{run.path('report.json')} does not exist: {run_dir} is not a finished run "
                                "folder (edc-ray condense writes report.json last)")
    report = run.read_json("report.json")
    text = markdown(report)
    if write:
        run.write_text(text, "report.md")
        if "shown" in report:  # (report.json files from before report.html lack what it shows)
            write_html_report(run, report)
    return text


def main(argv: list[str] | None = None) -> int:
    """Print the report of the run folder given; returns the exit status."""
    parser = command_parser("edc-ray report", "Show the report of a finished run folder.", config_keys=False)
    parser.add_argument("run_dir", help="a run folder (output.run_dir of a finished condense)")
    parser.add_argument("--write", action="store_true",
                        help="also write report.md and report.html into the run folder")
    args = parser.parse_args(argv)
    text = run_job(lambda: show_report(args.run_dir, args.write))
    if text is None:
        return 2
    sys.stdout.write(text)
    return 0
