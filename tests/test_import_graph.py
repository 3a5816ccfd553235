"""`pipeline.dev.import_graph` counts the imports that run: lazy ones inside functions, not `if TYPE_CHECKING:`."""

from pipeline.dev.import_graph import graph


def test_type_checking_imports_are_not_edges_but_lazy_imports_are(tmp_path):
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "high").mkdir()
    for folder in (package, package / "low", package / "high"):
        (folder / "__init__.py").write_text("")
    (package / "high" / "a.py").write_text("")
    (package / "low" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import typing\n"
        "if TYPE_CHECKING:\n    from pkg.high.a import Thing\n"
        "if typing.TYPE_CHECKING:\n    import pkg.high\nelse:\n    import pkg.low\n"
        "def lazy():\n    from pkg.high import a\n")
    edges, _ = graph(package)
    assert edges["pkg.low.b"] == {"pkg.high", "pkg.high.a", "pkg.low"}
