"""`create_model_list.py from-hub`: a base model's tree listed by the real huggingface_hub
client from the stand-in Hub's `GET /api/models` (filter tags, author, search, sort, limit,
pages linked by `Link`), as a model list the experiment reads; then one study end to end.
What was asked of the Hub, and with which token, is read from the server's log."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from esd.model_list import read_model_list
from hub_server import hub, tree_tags  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
CREATE = [sys.executable, str(ROOT / "create_model_list.py"), "from-hub"]
TOKEN = "hf_tree_token"


def from_hub(hub, tmp_path, *args, token=None, output="tree.csv", extra_env=None):
    """Run `create_model_list.py from-hub ARGS --output tmp/OUTPUT`; (result, path)."""
    out = tmp_path / output
    env = hub.subprocess_env(tmp_path / "hf_home", token)
    env.update(PYTHONPATH=str(ROOT), **(extra_env or {}))
    result = subprocess.run(CREATE + [str(a) for a in args] + ["--output", str(out)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return result, out


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def ids(rows) -> list[str]:
    return [row["model_id"] for row in rows]


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def family(hub):
    """org/base with 8 fine-tunes and 3 adapters (downloads and likes in opposite orders),
    2 quantized children and an unrelated model; the stand-in's pages hold 3 models."""
    hub.add_model("org/base", downloads=5000, likes=50, library_name="transformers",
                  pipeline_tag="text-generation", created_at="2023-01-01T00:00:00.000Z")
    for i in range(8):
        hub.add_model(f"user{i}/base-ft{i}", tags=tree_tags("finetune", "org/base"),
                      downloads=100 * i, likes=10 - i,
                      created_at=f"2024-0{i + 1}-01T00:00:00.000Z")
    for i in range(3):
        hub.add_model(f"lab/base-lora{i}", tags=tree_tags("adapter", "org/base"),
                      downloads=100 * i + 50, likes=20 + i, library_name="peft",
                      created_at=f"2023-0{i + 2}-15T00:00:00.000Z")
    for i in range(2):
        hub.add_model(f"quant/base-gguf{i}", tags=tree_tags("quantized", "org/base"),
                      downloads=9000 - i)
    hub.add_model("other/unrelated", downloads=99999)


def test_children_follow_the_base_by_downloads_descending_with_metadata_across_pages(
        hub, tmp_path, family):
    result, out = from_hub(hub, tmp_path, "--base", "org/base")
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    children = [("user7/base-ft7", 700), ("user6/base-ft6", 600), ("user5/base-ft5", 500),
                ("user4/base-ft4", 400), ("user3/base-ft3", 300), ("lab/base-lora2", 250),
                ("user2/base-ft2", 200), ("lab/base-lora1", 150), ("user1/base-ft1", 100),
                ("lab/base-lora0", 50), ("user0/base-ft0", 0)]
    assert [(r["model_id"], int(r["downloads"])) for r in rows] == \
        [("org/base", 5000)] + children
    assert rows[0]["base_model_relation"] == "base" and rows[0]["source_model"] == ""
    assert {r["source_model"] for r in rows[1:]} == {"org/base"}
    relations = {r["model_id"]: r["base_model_relation"] for r in rows}
    assert relations["lab/base-lora0"] == "adapter" and relations["user0/base-ft0"] == "finetune"
    lora = next(r for r in rows if r["model_id"] == "lab/base-lora1")
    assert (lora["likes"], lora["created_at"], lora["library_name"], lora["pipeline_tag"],
            lora["gated"]) == ("21", "2023-03-15T00:00:00Z", "peft", "text-generation", "false")
    # the experiment reads it: adapters are adapters, the base is a base
    entries = read_model_list(out)
    assert [e.model_id for e in entries] == ids(rows)
    assert [e.relation_says_adapter for e in entries] == [r["base_model_relation"] == "adapter"
                                                          for r in rows]
    # asked as HfApi.list_models asks, one relation at a time, and the Link pages followed
    assert len(hub.requests("hub", "GET", "/api/models/org/base")) == 1
    queries = hub.listing.queries
    finetune = [q for q in queries if q["filter"] == ["base_model:finetune:org/base"]]
    assert [q.get("cursor", ["0"]) for q in finetune] == [["0"], ["3"], ["6"]]
    assert all(q["sort"] == ["downloads"] and q["limit"] == ["101"] and "downloads" in q["expand"]
               for q in queries)
    assert sorted(q["filter"][0] for q in queries if "cursor" not in q) == [
        "base_model:adapter:org/base", "base_model:finetune:org/base",
        "base_model:quantized:org/base"]


def test_the_stand_in_lists_what_huggingface_hub_list_models_expects(hub, tmp_path, family):
    """HfApi.list_models itself, through the stand-in: filter, sort, limit, author, search,
    Link pages; the query it sends is the one from-hub sends."""
    script = (
        "from huggingface_hub import HfApi\n"
        "api = HfApi()\n"
        "print([m.id for m in api.list_models(filter='base_model:finetune:org/base', "
        "sort='likes', limit=4)])\n"
        "print([m.id for m in api.list_models(filter='base_model:adapter:org/base', "
        "sort='created_at')])\n"
        "print([m.id for m in api.list_models(author='lab', search='lora1')])\n"
        "print(sorted(m.id for m in api.list_models(filter=['base_model:org/base', "
        "'base_model:quantized:org/base'])))\n")
    env = hub.subprocess_env(tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(["user0/base-ft0", "user1/base-ft1", "user2/base-ft2", "user3/base-ft3"]),
        str(["lab/base-lora2", "lab/base-lora1", "lab/base-lora0"]),
        str(["lab/base-lora1"]),
        str(["quant/base-gguf0", "quant/base-gguf1"])]
    pages = [r for r in hub.requests("hub", "GET", "/api/models") if r.path == "/api/models"]
    assert len(pages) == 2 + 1 + 1 + 1       # 4 of 8 fine-tunes in pages of 3: two pages


def test_from_hub_asks_the_hub_exactly_what_hfapi_list_models_asks(hub, tmp_path, family):
    from esd.model_tree import EXPAND
    script = ("from huggingface_hub import HfApi\n"
              "list(HfApi().list_models(filter=['base_model:finetune:org/base'], author='user3', "
              f"search='ft', sort='likes', limit=101, expand={EXPAND!r}))\n")
    env = hub.subprocess_env(tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--relation", "finetune",
                           "--author", "user3", "--search", "ft", "--sort", "likes")
    assert result.returncode == 0, result.stderr
    assert ids(rows_of(out)) == ["org/base", "user3/base-ft3"]
    theirs, ours = hub.listing.queries[0], hub.listing.queries[1]
    assert ours == theirs and ours["sort"] == ["likes"]


def test_sort_and_limit_pick_the_best_children_across_relations(hub, tmp_path, family):
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--sort", "likes",
                           "--limit", "4")
    assert result.returncode == 0, result.stderr
    assert ids(rows_of(out)) == ["org/base", "lab/base-lora2", "lab/base-lora1",
                                 "lab/base-lora0", "user0/base-ft0"]
    assert "1 parent with more than --limit 4 children" in result.stderr
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--sort", "created_at",
                           "--limit", "2", "--relation", "finetune", output="new.csv")
    assert result.returncode == 0, result.stderr
    assert ids(rows_of(out)) == ["org/base", "user7/base-ft7", "user6/base-ft6"]


def test_quantized_children_are_left_out_with_a_count_and_listed_when_asked(hub, tmp_path,
                                                                            family):
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--no-base")
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert "org/base" not in ids(rows) and not any("gguf" in i for i in ids(rows))
    assert len(rows) == 11
    assert "left out 2 quantized children: the analysis refuses quantized checkpoints" \
        in result.stderr
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--relation", "quantized",
                           output="quantized.csv")
    assert result.returncode == 0, result.stderr
    assert [(r["model_id"], r["base_model_relation"]) for r in rows_of(out)] == [
        ("org/base", "base"), ("quant/base-gguf0", "quantized"),
        ("quant/base-gguf1", "quantized")]
    assert "left out" not in result.stderr


def test_a_merge_child_has_no_source_model_and_a_line_says_why(hub, tmp_path):
    hub.add_model("org/a", downloads=10)
    hub.add_model("org/b", downloads=10)
    hub.add_model("mix/a-b-merge", tags=tree_tags("merge", "org/a", "org/b"), downloads=5)
    hub.add_model("ft/a-ft", tags=tree_tags("finetune", "org/a"), downloads=3)
    result, out = from_hub(hub, tmp_path, "--base", "org/a", "--relation", "finetune", "merge")
    assert result.returncode == 0, result.stderr
    assert [(r["model_id"], r["source_model"], r["base_model_relation"])
            for r in rows_of(out)] == [("org/a", "", "base"), ("mix/a-b-merge", "", "merge"),
                                       ("ft/a-ft", "org/a", "finetune")]
    assert "1 merge child of several bases: source_model left empty" in result.stderr


def test_depth_two_lists_adapters_of_fine_tunes_under_their_parent_each_model_once(hub,
                                                                                 tmp_path):
    hub.add_model("org/base", downloads=100, tags=tree_tags("finetune", "ft/one"))  # a cycle
    hub.add_model("ft/one", tags=tree_tags("finetune", "org/base"), downloads=50)
    hub.add_model("ft/two", tags=tree_tags("finetune", "org/base"), downloads=40)
    hub.add_model("lora/on-one", tags=tree_tags("adapter", "ft/one"), downloads=30)
    hub.add_model("lora/on-two", tags=tree_tags("adapter", "ft/two"), downloads=20)
    hub.add_model("lora/on-both", tags=tree_tags("adapter", "org/base", "ft/one"), downloads=10)
    hub.add_model("lora/deeper", tags=tree_tags("adapter", "lora/on-one"), downloads=5)
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--depth", "2")
    assert result.returncode == 0, result.stderr
    assert [(r["model_id"], r["source_model"], r["base_model_relation"])
            for r in rows_of(out)] == [
        ("org/base", "", "base"),
        ("ft/one", "org/base", "finetune"), ("ft/two", "org/base", "finetune"),
        ("lora/on-both", "org/base", "adapter"),
        ("lora/on-one", "ft/one", "adapter"), ("lora/on-two", "ft/two", "adapter")]
    assert "2 models reached from more than one parent: listed once" in result.stderr
    result, out = from_hub(hub, tmp_path, "--base", "org/base", output="one.csv")
    assert ids(rows_of(out)) == ["org/base", "ft/one", "ft/two", "lora/on-both"]


def test_gated_and_private_models_are_listed_marked_and_counted_without_a_token(hub,
                                                                               tmp_path):
    hub.add_model("org/base", downloads=100)
    hub.add_model("lab/gated-ft", tags=tree_tags("finetune", "org/base"), downloads=30,
                  gated="manual", tokens=(TOKEN,))
    hub.add_model("lab/private-lora", tags=tree_tags("adapter", "org/base"), downloads=20,
                  private=True, tokens=(TOKEN,))
    hub.add_model("lab/open-ft", tags=tree_tags("finetune", "org/base"), downloads=10)
    result, out = from_hub(hub, tmp_path, "--base", "org/base")
    assert result.returncode == 0, result.stderr
    rows = {r["model_id"]: r for r in rows_of(out)}
    assert list(rows) == ["org/base", "lab/gated-ft", "lab/open-ft"]    # private: not visible
    assert rows["lab/gated-ft"]["gated"] == "manual" and rows["lab/open-ft"]["gated"] == "false"
    assert "1 of 3 models are gated (lab/gated-ft) and no Hugging Face token is set" \
        in result.stderr and "HF_TOKEN" in result.stderr
    # with a token: the private adapter is listed and marked, no gated warning
    result, out = from_hub(hub, tmp_path, "--base", "org/base", token=TOKEN, output="t.csv")
    assert result.returncode == 0, result.stderr
    rows = {r["model_id"]: r for r in rows_of(out)}
    assert list(rows) == ["org/base", "lab/gated-ft", "lab/private-lora", "lab/open-ft"]
    assert rows["lab/private-lora"]["private"] == "true" and rows["org/base"]["private"] == "false"
    assert "note:" not in result.stderr
    assert {r.token for r in hub.requests("hub")} == {None, TOKEN}


def test_pin_fills_revision_with_each_models_current_commit(hub, tmp_path):
    shas = {"org/base": hub.add_model("org/base", downloads=100),
            "ft/one": hub.add_model("ft/one", tags=tree_tags("finetune", "org/base"),
                                    downloads=5)}
    shas["ft/one"] = hub.add_model("ft/one", {"config.json": b'{"v": 2}'},
                                   tags=tree_tags("finetune", "org/base"), downloads=5)
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--pin")
    assert result.returncode == 0, result.stderr
    assert {r["model_id"]: r["revision"] for r in rows_of(out)} == shas
    assert rows_of(out)[1]["source_model"] == f"org/base@{shas['org/base']}"
    assert [e.key for e in read_model_list(out)] == [f"{i}@{s}" for i, s in shas.items()]
    result, out = from_hub(hub, tmp_path, "--base", "org/base", output="unpinned.csv")
    assert {r["revision"] for r in rows_of(out)} == {""}


def test_an_unknown_base_is_named_and_nothing_is_written(hub, tmp_path):
    result, out = from_hub(hub, tmp_path, "--base", "nobody/missing")
    assert_clean_error(result, "nobody/missing: no such model on the Hub")
    assert not out.exists()
    assert_clean_error(from_hub(hub, tmp_path, "--base", "bad//id")[0], "--base bad//id")
    assert_clean_error(from_hub(hub, tmp_path)[0], "from-hub needs --base")
    assert_clean_error(from_hub(hub, tmp_path, "--base", "org/x", "--limit", "0")[0],
                       "--limit must be 1 or more")
    offline = from_hub(hub, tmp_path, "--base", "org/x", extra_env={"HF_HUB_OFFLINE": "1"})[0]
    assert_clean_error(offline, "HF_HUB_OFFLINE is set")
    assert [r.path for r in hub.requests("hub")] == ["/api/models/nobody/missing"]


def test_an_empty_tree_says_so_and_writes_nothing(hub, tmp_path):
    hub.add_model("org/lonely", downloads=1)
    hub.add_model("quant/lonely-gguf", tags=tree_tags("quantized", "org/lonely"))
    result, out = from_hub(hub, tmp_path, "--base", "org/lonely")
    assert_clean_error(result, "org/lonely has no adapter or finetune children on the Hub",
                       "its 1 quantized children are left out", "nothing written")
    assert not out.exists()


def test_a_429_burst_is_retried_and_a_storm_fails_with_a_message(hub, tmp_path, family):
    hub.faults.rate_limit, hub.faults.retry_after = 2, 0
    hub.faults.rate_limit_paths = "/api/models"
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--limit", "3")
    assert result.returncode == 0, result.stderr
    assert len(rows_of(out)) == 4
    assert [r.status for r in hub.requests("hub")][:3] == [429, 429, 200]
    hub.faults.rate_limit = 1000
    result, out = from_hub(hub, tmp_path, "--base", "org/base", output="storm.csv")
    assert_clean_error(result, "429 Too Many Requests", "after huggingface_hub's retries",
                       "reading org/base")
    assert not out.exists()
    assert len([r for r in hub.requests("hub") if r.status == 429]) > 2 + 3


def test_author_and_search_without_a_base_list_the_matching_models_as_bases(hub, tmp_path,
                                                                            family):
    result, out = from_hub(hub, tmp_path, "--author", "lab", "--sort", "likes")
    assert result.returncode == 0, result.stderr
    assert [(r["model_id"], r["base_model_relation"], r["source_model"])
            for r in rows_of(out)] == [("lab/base-lora2", "base", ""),
                                       ("lab/base-lora1", "base", ""),
                                       ("lab/base-lora0", "base", "")]
    result, out = from_hub(hub, tmp_path, "--search", "ft3", output="s.csv")
    assert ids(rows_of(out)) == ["user3/base-ft3"]
    result, out = from_hub(hub, tmp_path, "--search", "org/base", "--depth", "1", "--limit",
                           "2", output="d.csv")
    assert ids(rows_of(out)) == ["org/base", "user7/base-ft7", "user6/base-ft6"]
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--author", "lab",
                           output="b.csv")                # with a base: narrows its children
    assert ids(rows_of(out)) == ["org/base", "lab/base-lora2", "lab/base-lora1",
                                 "lab/base-lora0"]
    assert_clean_error(from_hub(hub, tmp_path, "--author", "nobody", output="n.csv")[0],
                       "no model on the Hub matches --author nobody")


def test_a_next_page_on_another_host_is_not_followed_and_the_token_stays_home(hub, tmp_path,
                                                                               family):
    hub.listing.next_url = f"{hub.cdn}/api/models?cursor=3"
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--relation", "finetune",
                           token=TOKEN)
    assert result.returncode == 0, result.stderr
    assert ids(rows_of(out)) == ["org/base", "user7/base-ft7", "user6/base-ft6",
                                 "user5/base-ft5"]
    assert "listing the finetune children of org/base was cut short: the next page is on " \
        "another host" in result.stderr
    assert hub.requests("cdn") == []
    assert all(r.token == TOKEN for r in hub.requests("hub"))


def test_a_next_link_that_loops_stops_the_listing(hub, tmp_path, family):
    hub.listing.next_url = (f"{hub.endpoint}/api/models?filter=base_model%3Afinetune%3A"
                            f"org%2Fbase&sort=downloads&cursor=3")
    result, out = from_hub(hub, tmp_path, "--base", "org/base", "--relation", "finetune")
    assert result.returncode == 0, result.stderr
    assert "the listing loops" in result.stderr
    assert ids(rows_of(out)) == ["org/base", "user7/base-ft7", "user6/base-ft6",
                                 "user5/base-ft5", "user4/base-ft4", "user3/base-ft3",
                                 "user2/base-ft2"]
    assert [q.get("cursor") for q in hub.listing.queries
            if q["filter"] == ["base_model:finetune:org/base"]] == [None, ["3"]]


def test_a_page_walk_stops_at_its_page_bound(hub, family):
    from esd.hub_pages import PageWalk
    walk = PageWalk(f"{hub.endpoint}/api/models", {"sort": "downloads"}, max_pages=2)
    pages = list(walk.pages())
    assert [len(p) for p in pages] == [3, 3] and walk.fetched == 2
    assert walk.stopped == "stopped after 2 pages"
    whole = PageWalk(f"{hub.endpoint}/api/models", {"sort": "downloads"})
    assert sum(len(p) for p in whole.pages()) == 15 and whole.stopped is None


@pytest.mark.slow
def test_a_study_from_a_base_id_end_to_end_carries_downloads_and_shows_the_tree(hub, tmp_path):
    """from-hub over repos holding real tiny models -> run_esd_experiment.py -> summary.csv
    with the list's metadata beside each model's statistics, and the report's by-relation
    section (the carrying of list columns and the by-relation view belong to the analysis)."""
    import pandas as pd
    from tiny_models import save_adapter, save_fine_tune, save_model
    base = save_model("gpt2", tmp_path / "m" / "base", seed=5)
    downloads = {"org/base": 900, "ft/one": 300, "ft/two": 200, "lab/lora": 100}
    hub.add_model("org/base", base, downloads=downloads["org/base"])
    for seed, name in enumerate(("ft/one", "ft/two"), start=1):
        tuned = save_fine_tune(base, tmp_path / "m" / name.replace("/", "-"), seed=seed)
        hub.add_model(name, tuned, tags=tree_tags("finetune", "org/base"),
                      downloads=downloads[name])
    lora = save_adapter("gpt2", base, tmp_path / "m" / "lora", base_id="org/base",
                        target_modules=["c_attn"], fan_in_fan_out=True)
    hub.add_model("lab/lora", lora, tags=tree_tags("adapter", "org/base"), library_name="peft",
                  downloads=downloads["lab/lora"])
    hub.add_model("quant/base-gguf", {"model.gguf": b"g" * 100},
                  tags=tree_tags("quantized", "org/base"), downloads=5000)

    result, model_list = from_hub(hub, tmp_path, "--base", "org/base", "--pin")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "study"
    env = hub.subprocess_env(tmp_path / "hf_home")
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(
        [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list", str(model_list),
         "--output_dir", str(out), "--gpus", "none", "--cpu_workers", "2",
         "--poll_interval", "0.05", "--max_check", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = pd.read_csv(out / "summary.csv")
    assert "downloads" in summary.columns, list(summary.columns)
    pinned = {f"{model}@{hub.repos[model].refs['main']}": count
              for model, count in downloads.items()}
    assert summary.groupby("model_id")["downloads"].first().to_dict() == pinned
    lora = pd.read_csv(next(out.glob("lab--lora@*.csv")))     # merged into the pinned base
    assert set(lora["source_model"]) == {f"org/base@{hub.repos['org/base'].refs['main']}"}
    analyze = [sys.executable, str(ROOT / "analyze_results.py"), "--results_dir", str(out)]
    by_relation = subprocess.run(analyze + ["--by_relation"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=600)
    assert by_relation.returncode == 0, by_relation.stdout + by_relation.stderr
    assert "org/base" in by_relation.stdout
    report = subprocess.run(analyze + ["--report"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0, report.stdout + report.stderr
    page = (out / "report.html").read_text()
    import re
    assert re.search(r"<h2>[^<]*relation[^<]*</h2>", page, re.IGNORECASE), "no by-relation section"
    assert "ft/one" in page and "lab/lora" in page


def test_from_hub_answers_to_its_underscore_name_and_prints_the_list_without_output(hub,
                                                                                   tmp_path):
    hub.add_model("org/base", downloads=3)
    hub.add_model("ft/one", tags=tree_tags("finetune", "org/base"), downloads=2)
    env = hub.subprocess_env(tmp_path / "hf_home")
    env.update(PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "create_model_list.py"), "from_hub",
                             "--base", "org/base", "--no-base", "--sort", "last_modified"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model_id,source_model,base_model_relation,revision,downloads,")
    assert [line.split(",")[:3] for line in lines[1:]] == [["ft/one", "org/base", "finetune"]]
    assert hub.listing.queries[0]["sort"] == ["lastModified"]
