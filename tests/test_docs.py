"""The README says what the code does: the report's fields, the commands, the modules it names."""

import re
from pathlib import Path

from recommend.cli import app
from recommend.run.report import RefreshReport, schema

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_names_every_field_of_the_run_report():
    table = README.split("<!-- report-fields -->", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`(\w+)`", "\n".join(line.split("|")[1] for line in table.splitlines()[2:])))
    assert named == set(RefreshReport.model_fields)


def test_schema_covers_the_report_the_manifests_and_eval():
    defs = schema()["$defs"]
    assert {"RefreshReport", "IngestManifest", "EmbedManifest", "GateManifest", "IndexManifest", "PublishManifest",
            "EvalResult"} <= set(defs)
    assert set(defs["RefreshReport"]["properties"]) == set(RefreshReport.model_fields)


def test_readme_shows_every_command_and_names_only_modules_that_exist():
    root = Path(__file__).parent.parent
    for command in app.registered_commands:
        assert f"recs {command.name or command.callback.__name__}" in README
    for module in set(re.findall(r"`((?:embedder|index|recommend)/[\w/]+\.py)`", README)):
        assert (root / module).is_file(), module
