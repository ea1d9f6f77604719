"""The README and docs/ say what the code does: the report's fields, the commands, the modules they
name, every setting; and the README stays a short user's guide."""

import re
from pathlib import Path

from recommend.cli import app
from recommend.run.report import RefreshReport, schema

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}


def test_the_design_doc_names_every_field_of_the_run_report():
    table = DOCS["design.md"].split("<!-- report-fields -->", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`(\w+)`", "\n".join(line.split("|")[1] for line in table.splitlines()[2:])))
    assert named == set(RefreshReport.model_fields)


def test_schema_covers_the_report_the_manifests_and_eval():
    defs = schema()["$defs"]
    assert {"RefreshReport", "IngestManifest", "EmbedManifest", "GateManifest", "IndexManifest", "PublishManifest",
            "EvalResult"} <= set(defs)
    assert set(defs["RefreshReport"]["properties"]) == set(RefreshReport.model_fields)


def test_readme_shows_every_command_and_the_docs_name_only_modules_and_files_that_exist():
    for command in app.registered_commands:
        assert f"recs {command.name or command.callback.__name__}" in README
    for text in (README, *DOCS.values()):
        for module in set(re.findall(r"`((?:embedder|index|recommend|tests)/[\w/]+\.py)`", text)):
            assert (ROOT / module).is_file(), module
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)\)", README):
        assert (ROOT / link).is_file(), link


def test_the_readme_is_a_short_guide_that_starts_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 300
    blocks = README.split("```bash\n")[1:3]
    assert ".venv/bin/recs refresh --config config.yaml" in blocks[0] and ".venv/bin/python -m pytest" in blocks[1]
    assert ".venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented_in_the_reference_written_from_the_models():
    from recommend.cli.config_reference import reference, settings

    assert all(description for _, _, description in settings()), [k for k, _, d in settings() if not d]
    assert DOCS["configuration.md"] == reference()  # regenerate: python -m recommend.cli.config_reference
