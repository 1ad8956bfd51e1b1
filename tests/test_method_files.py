"""Method files from PRUNE_METHODS_PATH that cannot be loaded: one PruneConfigError naming the variable, the file
(and line) and what is allowed, before any model loads; a failed file leaves no trace in the registry."""

import sys
import textwrap

import pytest

import methods
from methods import _base
from tests.conftest import run_runner
from utils import PruneConfig, PruneConfigError

GOOD = '''
from methods import register_prune


@register_prune("file_ok_pre_llm")
def file_ok_pre_llm(ctx):
    """Keep the first tokens."""
    return ctx.features.new_zeros(0).long()
'''


@pytest.fixture(autouse=True)
def registry_restored():
    """The registry is global to the process: leave it (and the loaded files, and their modules) as found."""
    methods.load_methods()
    registry, loaded, modules = dict(_base._REGISTRY), set(methods._loaded_paths), set(sys.modules)
    yield
    _base._REGISTRY.clear()
    _base._REGISTRY.update(registry)
    methods._loaded_paths.clear()
    methods._loaded_paths.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith("_prune_user_methods."):
            del sys.modules[name]


def write(folder, name, text):
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def config_error(**env) -> str:
    with pytest.raises(PruneConfigError) as err:
        PruneConfig.from_env({k: str(v) for k, v in env.items()})
    return str(err.value)


def user_modules(path):
    return [name for name, module in sys.modules.items()
            if name.startswith("_prune_user_methods.") and getattr(module, "__file__", None) == str(path)]


def test_a_syntax_error_names_the_variable_the_file_and_the_line(tmp_path):
    path = write(tmp_path, "broken.py", '''
        from methods import register_prune

        def broken_pre_llm(ctx)
            return ctx.features
    ''')
    message = config_error(PRUNE_METHODS_PATH=path, KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm")
    assert message.startswith(f"PRUNE_METHODS_PATH={str(path)!r}: method file {path}, line 3: syntax error")
    assert "allowed: a method file that is valid Python" in message
    assert not user_modules(path)


def test_a_bad_file_in_a_folder_entry_is_named(tmp_path):
    write(tmp_path, "fine.py", GOOD)
    path = write(tmp_path, "oops.py", "x = (\n")
    message = config_error(PRUNE_METHODS_PATH=tmp_path)
    assert message.startswith(f"PRUNE_METHODS_PATH={str(tmp_path)!r}: method file {path}, line 1: syntax error")


def test_a_duplicate_name_names_both_files_and_asks_for_another_name(tmp_path):
    builtin = methods.registered_methods()["random_pre_llm"]
    path = write(tmp_path, "dup.py", '''
        import torch

        from methods import register_prune


        @register_prune("random_pre_llm")
        def my_random_pre_llm(ctx):
            """A second random_pre_llm."""
            return torch.arange(ctx.keep)
    ''')
    message = config_error(PRUNE_METHODS_PATH=path)
    assert message.startswith(f"PRUNE_METHODS_PATH={str(path)!r}: method file {path}, line 6: ")
    assert "'random_pre_llm' is registered twice" in message and "random_prune.py" in message
    assert message.endswith("allowed: a name not registered yet: rename it (see `python -m methods` for the names "
                            "in use)")
    assert methods.registered_methods()["random_pre_llm"] == builtin  # the built-in method is untouched
    assert not user_modules(path)


def test_a_name_without_a_stage_suffix_is_explained(tmp_path):
    path = write(tmp_path, "nosuffix.py", '''
        from methods import register_prune


        @register_prune("mymethod")
        def mymethod(ctx):
            """No stage suffix."""
            return ctx.features
    ''')
    message = config_error(PRUNE_METHODS_PATH=path)
    assert message.startswith(f"PRUNE_METHODS_PATH={str(path)!r}: method file {path}, line 4: ")
    assert "method name 'mymethod' must end with '_vit', '_pre_llm', '_intra_llm' or '_kv'" in message
    assert "allowed: a method name ending in '_vit', '_pre_llm', '_intra_llm' or '_kv'" in message


def test_any_other_import_error_names_the_file_and_the_error(tmp_path):
    path = write(tmp_path, "raises.py", '''
        import methods

        SETTINGS = {}
        SCALE = SETTINGS["scale"]
    ''')
    message = config_error(PRUNE_METHODS_PATH=path)
    assert message.startswith(f"PRUNE_METHODS_PATH={str(path)!r}: method file {path}, line 4: "
                              "importing it raised KeyError: 'scale'")
    assert "allowed: a method file that imports without error" in message


def test_a_failed_file_leaves_nothing_half_registered_and_loads_once_fixed(tmp_path):
    """Its methods registered before the failure are removed (else a retry would find them 'registered twice')."""
    path = write(tmp_path, "half.py", GOOD + '\nraise RuntimeError("not finished")\n')
    message = config_error(PRUNE_METHODS_PATH=path)
    assert "line 9: importing it raised RuntimeError: not finished" in message
    assert "file_ok_pre_llm" not in methods.registered_methods() and not user_modules(path)
    assert config_error(PRUNE_METHODS_PATH=path) == message  # the same error again, not 'registered twice'
    write(tmp_path, "half.py", GOOD)
    config = PruneConfig.from_env({"PRUNE_METHODS_PATH": str(path), "KEEP_RATIO": "0.5",
                                   "PRUNE_METHOD": "file_ok_pre_llm"})
    assert config.pre_llm.method == "file_ok_pre_llm" and len(user_modules(path)) == 1


def test_the_runner_exits_2_with_the_message_before_vlmeval_starts(tmp_path, capsys):
    path = write(tmp_path, "broken.py", "def broken_pre_llm(ctx)\n    return ctx.features\n")
    argv = ["--model", "Qwen2.5-VL-7B-Instruct", "--data", "MME", "--work-dir", str(tmp_path / "outputs")]
    assert run_runner(argv, {"PRUNE_METHODS_PATH": str(path), "KEEP_RATIO": "0.5"}) == 2
    err = capsys.readouterr().err
    assert f"run_qwenvl.py: error: PRUNE_METHODS_PATH={str(path)!r}: method file {path}, line 1: syntax error" in err
    assert not (tmp_path / "outputs").exists()


def test_the_method_listing_reports_a_bad_file_without_a_traceback(tmp_path, monkeypatch):
    from methods.__main__ import main

    path = write(tmp_path, "broken.py", "x = (\n")
    monkeypatch.setenv("PRUNE_METHODS_PATH", str(path))
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert str(exit_.value).startswith(f"python -m methods: error: PRUNE_METHODS_PATH={str(path)!r}: method file "
                                       f"{path}, line 1: syntax error")
