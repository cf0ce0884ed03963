"""The mistakes a newcomer makes first get errors that name the argument, what was expected,
what came, and the fix (not a bare TypeError from deep inside the solver)."""
import warnings

import pytest
import torch

import deqfast


class CellZX(torch.nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.W = torch.nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + x)


class CellZ(torch.nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.W = torch.nn.Linear(d, d)

    def forward(self, z):
        return torch.tanh(self.W(z))


@pytest.mark.parametrize("cell", [CellZ(), lambda z: 0.5 * z], ids=["module", "lambda"])
def test_deq_with_a_cell_of_z_alone_names_the_signature_and_the_fix(cell):
    with pytest.raises(TypeError, match=r"deqfast\.DEQ: cell must be a callable \(z, x\).*takes \(z\).*"
                                        r"deqfast\.fixed_point"):
        deqfast.DEQ(cell)


def test_deq_given_the_class_instead_of_an_instance():
    with pytest.raises(TypeError, match=r"deqfast\.DEQ: cell .*got the class CellZX itself; pass an instance"):
        deqfast.DEQ(CellZX)


@pytest.mark.parametrize("call", [
    lambda f, z0: deqfast.fixed_point(f, z0),
    lambda f, z0: deqfast.solvers.anderson(f, z0),
    lambda f, z0: deqfast.solvers.fixed_point_iteration(f, z0),
    lambda f, z0: deqfast.solvers.broyden(f, z0),
    lambda f, z0: deqfast.jacobian_penalty(f, z0),
], ids=["fixed_point", "anderson", "fixed_point_iteration", "broyden", "jacobian_penalty"])
def test_a_cell_of_z_and_x_given_as_f_names_the_closure_fix(call):
    with pytest.raises(TypeError, match=r"f must be a callable z -> f\(z\) of one argument, got CellZX, whose "
                                        r"forward takes \(z, x\); close over the other arguments.*lambda z: cell\(z, x\)"):
        call(CellZX(), torch.zeros(2, 4))


def test_callables_that_take_the_arguments_still_run():
    x = torch.randn(3, 4)
    # defaults and *args bind; builtins have no readable signature and are not checked
    layer = deqfast.DEQ(lambda z, x, scale=0.5: scale * torch.tanh(z) + x)
    assert layer(x).shape == (3, 4)
    assert deqfast.DEQ(CellZX())(x).shape == (3, 4)
    z, _ = deqfast.fixed_point(torch.tanh, torch.zeros(3, 4))
    assert torch.allclose(z, torch.zeros(3, 4))
    z, _ = deqfast.fixed_point(lambda *zs: 0.5 * zs[0] + 1.0, torch.zeros(3, 4), tol=1e-8, max_iter=100)
    assert torch.allclose(z, torch.full((3, 4), 2.0), atol=1e-5)


def test_the_signature_check_remembers_only_what_decides_it():
    """check_arguments caches accepted signatures (by code, defaults' count, keyword-only defaults):
    a function changed after an accepted call, a lambda made anew with fewer defaults, or a module
    whose instance forward is replaced, is judged again."""
    z0 = torch.zeros(2, 4)

    def f(z, x=1.0):
        return 0.5 * z

    assert deqfast.fixed_point(f, z0, max_iter=2)[0].shape == (2, 4)
    f.__defaults__ = None  # now f(z, x): one argument no longer binds
    with pytest.raises(TypeError, match=r"f must be a callable z -> f\(z\) of one argument, got f, which takes"):
        deqfast.fixed_point(f, z0, max_iter=2)

    def g(z, *, k=1):
        return 0.5 * z

    assert deqfast.fixed_point(g, z0, max_iter=2)[0].shape == (2, 4)
    g.__kwdefaults__ = None  # k keyword-only without a default
    with pytest.raises(TypeError, match=r"got g, which takes \(z, \*, k\)"):
        deqfast.fixed_point(g, z0, max_iter=2)

    def make(defaults):
        return lambda z, x=1.0: 0.5 * z if defaults else None

    for _ in range(2):  # the same code made anew: accepted from the cache, same answer
        assert deqfast.fixed_point(make(True), z0, max_iter=2)[0].shape == (2, 4)
    late = make(True)
    late.__defaults__ = None
    with pytest.raises(TypeError, match=r"of one argument, got <lambda>, which takes \(z, x\)"):
        deqfast.fixed_point(late, z0, max_iter=2)

    cell = CellZ()
    assert deqfast.fixed_point(cell, z0, max_iter=2)[0].shape == (2, 4)
    cell.forward = lambda z, x: z  # an instance attribute: not the class's forward
    with pytest.raises(TypeError, match=r"of one argument, got CellZ, whose forward takes \(z, x\)"):
        deqfast.fixed_point(cell, z0, max_iter=2)


class DropCell(torch.nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.W = torch.nn.Linear(4, 4)
        self.drop = drop

    def forward(self, z, x):
        return self.drop(torch.tanh(self.W(z) + x))


def test_plain_dropout_in_the_cell_warns_once_and_names_the_fix():
    torch.manual_seed(0)
    layer = deqfast.DEQ(DropCell(torch.nn.Dropout(0.3)), max_iter=10)
    with pytest.warns(UserWarning, match=r"deqfast\.DEQ: the cell holds Dropout\(p=0\.3\) at cell\.drop, which "
                                         r"draws a new mask.*deqfast\.VariationalDropout") as record:
        layer(torch.randn(3, 4))
    assert record[0].filename == __file__  # points at the user's line, as the README says
    assert not bool(layer.stats.converged.any())  # what the warning announces
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(3, 4))  # once per layer


@pytest.mark.parametrize("make", [lambda: DropCell(deqfast.VariationalDropout(0.3)),
                                  lambda: DropCell(torch.nn.Dropout(0.0)),
                                  lambda: DropCell(torch.nn.Dropout(0.3)).eval()],
                         ids=["variational", "p0", "eval"])
def test_no_dropout_warning_where_the_mask_is_fixed(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deqfast.DEQ(make())(torch.randn(3, 4))


def test_digits_demo_help_states_each_default_once(capsys):
    """`python benchmarks/digits_demo.py --help` said '(default 30, --quick 3) (default: None)'."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "digits_demo.py"
    spec = importlib.util.spec_from_file_location("digits_demo_for_help", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default 30, --quick 3)" in text and "--width WIDTH (default: 256)" in text
    assert "(default: 0)" in text  # --seed: a default of 0 is still shown


def test_overhead_plot_of_a_noisy_run_does_not_warn(tmp_path):
    """`run.py --quick` on a busy machine printed matplotlib's 'Attempt to set non-positive ylim
    on a log-scaled axis': a negative overhead (iteration − f, both noisy) set the axis bottom."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import importlib
    import sys
    from pathlib import Path

    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        bench_overhead = importlib.import_module("bench_overhead")
    finally:
        sys.path.pop(0)
    names = bench_overhead.IMPLS[:2]
    rows = [{"B": 8, "d": 4096, "m": 5, names[0]: {"overhead_over_floor": 480.0},
             names[1]: {"overhead_over_floor": -4.3}},
            {"B": 64, "d": 512, "m": 5, names[0]: {"overhead_over_floor": 200.0},
             names[1]: {"overhead_over_floor": 0.8}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench_overhead.plot(rows, tmp_path / "overhead.png", plt, "test")
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_arrays_lists_and_tuples_where_a_tensor_is_expected_name_the_conversion():
    np = pytest.importorskip("numpy")
    f = lambda z: 0.5 * z  # noqa: E731
    with pytest.raises(TypeError, match=r"deqfast\.fixed_point: z0 must be a torch\.Tensor, got ndarray; convert "
                                        r"it with torch\.as_tensor\(z0"):
        deqfast.fixed_point(f, np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"deqfast\.DEQ: x must be a torch\.Tensor .*got ndarray; convert it with "
                                        r"torch\.as_tensor\(x"):
        deqfast.DEQ(CellZX())(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match=r"deqfast\.DEQ: x must be a torch\.Tensor .*got list.*pass z0 as well"):
        deqfast.DEQ(CellZX())([torch.zeros(2, 4)])
    with pytest.raises(TypeError, match=r"z0\[0\] must be a torch\.Tensor \(a list/tuple z0 is a state of several "
                                        r"tensors\), got list; .*torch\.tensor"):
        deqfast.fixed_point(f, [[0.0, 1.0], [2.0, 3.0]])
    with pytest.raises(TypeError, match=r"deqfast\.DEQ: f\(z\) must return a torch\.Tensor like z0, got tuple; "
                                        r"return the new state alone"):
        deqfast.DEQ(lambda z, x: (torch.tanh(z + x), None))(torch.randn(2, 4))


@pytest.mark.skipif(not hasattr(Exception, "add_note"), reason="exception notes: Python >= 3.11")
def test_a_z0_of_another_batch_size_than_x_is_named_when_the_cell_fails():
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError) as info:
        deqfast.DEQ(CellZX())(x, torch.zeros(3, 4))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "deqfast.DEQ: z0 has batch size 3 (dim 0), x has 8" in notes and "zeros_like(x)" in notes
    # a cell that broadcasts another batch size is not an error, and gets no note
    layer = deqfast.DEQ(lambda z, x: torch.tanh(0.5 * z + x.mean(dim=0)))
    assert layer(x, torch.zeros(3, 4)).shape == (3, 4)


def test_readme_commands_name_scripts_and_options_that_exist():
    """Every `python benchmarks/<script>.py ...` the README names exists, and run.py's and
    digits_demo.py's options it shows parse (the shell blocks are not run by test_readme.py)."""
    import importlib.util
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"python (benchmarks/[\w/]+\.py)([^`\n&|]*)", text)
    assert commands
    parsers = {}
    for script, rest in commands:
        assert (root / script).is_file(), script
        name = Path(script).stem
        if name not in ("run", "digits_demo"):
            continue
        if name not in parsers:
            spec = importlib.util.spec_from_file_location(f"readme_{name}", root / script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            parsers[name] = module.parse_args
        args = [a for a in shlex.split(rest.replace("[", " ").replace("]", " ")) if a]
        if "--out" in args and args.index("--out") == len(args) - 1:
            args.append("some/folder")  # the README's sentence goes on with the folder
        parsers[name](args)  # SystemExit (argparse's error) fails the test


def test_a_dict_state_points_to_a_list_state():
    z0 = {"h": torch.zeros(2, 3), "c": torch.zeros(2, 3)}
    with pytest.raises(TypeError, match=r"z0 must be a torch\.Tensor, got dict; a state of several tensors is a list"):
        deqfast.fixed_point(lambda z: z, z0)
