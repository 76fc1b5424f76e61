"""names.py is the one home of the names the pipeline and serving share; the files that cannot import it (the
stack's template, the compose file) must agree with it, and make and shell read it from there."""

import runpy
import sys

import yaml

import names
from tests.servers import ROOT


def test_the_stack_and_the_compose_file_default_to_the_same_model_name():
    # CloudFormation's own tags (!Ref, !Sub) are not YAML that safe_load knows; the parameter's text is plain.
    template = (ROOT / "infra" / "housing-mlops.yml").read_text()
    model_parameter = template[template.index("  ModelName:"):].split("\n\n")[0]
    assert f"Default: {names.MODEL_NAME}" in model_parameter
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["serve"]["environment"]["MODEL_NAME"] == f"${{MODEL_NAME:-{names.MODEL_NAME}}}"


def test_make_and_shell_read_the_default_from_names_py(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["names.py", "MODEL_NAME"])
    runpy.run_path(str(ROOT / "names.py"), run_name="__main__")
    assert capsys.readouterr().out == names.MODEL_NAME + "\n"
    assert "$(shell $(PYTHON) names.py MODEL_NAME)" in (ROOT / "Makefile").read_text()
    assert 'python "$root/names.py" MODEL_NAME' in (ROOT / "scripts" / "services.sh").read_text()


def test_an_empty_model_name_setting_means_the_default(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "")
    assert names.model_name() == names.MODEL_NAME
    monkeypatch.setenv("MODEL_NAME", "mine")
    assert names.model_name() == "mine"
