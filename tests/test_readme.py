"""The documentation runs as written and says what the code does.

Every ```python block of README.md and of each docs/*.md page runs, in order, in one namespace per
page, in a temporary folder. A page whose blocks import a library that is not installed is
skipped, naming it. Blocks fenced with another tag (```python-slow, ```bash, plain ```) are
illustrations and do not run. The tables docs/generate.py writes from the code equal the committed
ones, every relative link points to an existing file and heading, and nothing refers to files
outside the repository.
"""

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import lowrank_kernels as lk

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What a page's blocks must leave behind, besides running without an error.
WRITES = {
    "README.md": ["adapters.safetensors"],
    "docs/adapters.md": ["adapters.safetensors"],
    "docs/checkpoints.md": ["adapters.safetensors", "optimizer.pt"],
    "docs/distributed.md": ["ckpt"],
    "docs/integrations.md": ["adapter/adapter_model.safetensors", "accelerate-state"],
}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w/])((?:\.ci|benchmarks|csrc|docs|tests)/[\w./-]*+)(?![<*{])")


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def name(page):
    return page.relative_to(ROOT).as_posix()


def third_party_imports(blocks):
    """The top-level modules the blocks import that are neither the standard library nor this package."""
    modules = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return sorted(modules - set(sys.stdlib_module_names) - {"lowrank_kernels"})


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(text):
    """``text`` without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text):
    return {slug(heading) for heading in re.findall(r"^#+ (.*)$", prose(text), re.M)}


RUNNABLE = [page for page in PAGES if python_blocks(page.read_text())]


def test_the_pages_with_examples_are_all_collected():
    assert {"README.md", "docs/adapters.md", "docs/integrations.md", "docs/methods.md"} <= {name(p) for p in RUNNABLE}


@pytest.mark.parametrize("page", RUNNABLE, ids=name)
@pytest.mark.slow
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    for module in third_party_imports(blocks):
        pytest.importorskip(module, reason=f"{module} is not installed: {name(page)}'s examples need it")
    monkeypatch.chdir(tmp_path)  # the examples write adapters, checkpoints and states
    namespace = {"__name__": "docs_example"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{name(page)} python block {i}", "exec"), namespace)
    for path in WRITES.get(name(page), []):
        assert (tmp_path / path).exists(), f"{name(page)} should write {path}"


def test_generated_tables_are_up_to_date():
    generate = load_generator()
    for page in generate.pages():
        text = page.read_text()
        assert generate.regenerate(text) == text, f"{name(page)} is stale: run python docs/generate.py"
    assert "<!-- generated:method-defaults -->" in (ROOT / "docs" / "methods.md").read_text()


def test_generate_check_exits_1_on_a_stale_table(tmp_path, monkeypatch, capsys):
    generate = load_generator()
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "methods.md"
    page.write_text("<!-- generated:method-defaults -->\n| stale |\n<!-- end generated -->\n")
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    monkeypatch.setattr(generate, "pages", lambda: [page])
    assert generate.main(["--check"]) == 1
    assert "stale: docs/methods.md" in capsys.readouterr().out
    assert "| stale |" in page.read_text()
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0
    with pytest.raises(ValueError, match="unknown generated table 'nope'"):
        generate.regenerate("<!-- generated:nope -->\n<!-- end generated -->")


@pytest.mark.slow
def test_method_defaults_table_matches_the_methods():
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| (\d+) \|", (ROOT / "docs" / "methods.md").read_text(), re.M)
    assert sorted(name for name, _ in rows) == lk.available_methods()
    for method, rank in rows:
        assert lk.nn.get_method(method).default_rank == int(rank), method
        assert lk.LowRankLinear(512, 512, method=method).rank == int(rank), method


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_point_to_existing_files_and_headings(page):
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{name(page)} links to {target}: no such file"
        assert ROOT in linked.parents, f"{name(page)} links to {target}, outside the repository"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked.read_text()), f"{name(page)} links to {target}: no such heading"


def test_repository_paths_in_code_spans_exist():
    named = {(name(page), path) for page in PAGES for span in CODE_SPAN.findall(prose(page.read_text()))
             for path in REPO_PATH.findall(span)}
    assert ("docs/testing.md", "tests/test_readme.py") in named
    missing = sorted((page, path) for page, path in named if not (ROOT / path).exists())
    assert not missing, f"(page, path) pairs naming no file: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_nothing_refers_outside_the_repository(page):
    text = page.read_text()
    for outside in ("DESIGN.md", "MATH.md", "shared/"):
        assert outside not in text, f"{name(page)} refers to {outside}"
