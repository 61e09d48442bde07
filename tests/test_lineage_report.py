"""`agssp lineage`: the chain from sources to evaluations, read back from a real (small) demo run.

One headless run of the chain (demo corpus, 1 epoch everywhere, KeAD and pseudo-box quality evaluations
included, one byte-identical copy of a labelled image in the downstream set) serves every test of the
module; the staleness test changes artifacts in place and so runs last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from agssp_pipeline.cli import main as agssp_main
from agssp_pipeline.config import CONFIG_ENV_VAR, load_config
from agssp_pipeline.lineage_report import (
    MISSING,
    NEWER,
    STALE,
    LineageTargetError,
    build_lineage_report,
    infer_storage_root,
    parse_asset_target,
)
from agssp_pipeline.storage import StorageLayout

CHAIN = ["image_index", "anomaly_maps", "backbone_checkpoint", "category_thresholds", "pseudo_boxes",
         "detector_checkpoint", "finetune_evaluation", "kead_evaluation", "pseudo_box_quality"]
DROPPED_SOURCE = "demo_plant_line1"  # one pretraining source fewer keeps the run short
DOWNSTREAM = "demo_downstream"
MASKED_SOURCE = "demo_billet_masks"  # ground-truth masks: KeAD is evaluated on it
BOXED_SOURCE = "demo_rolled_voc"  # ground-truth boxes: its pseudo boxes are measured


def _copy_a_labelled_image(root: Path) -> None:
    """A byte copy (with its label file) of a downstream image: the index marks it a duplicate."""
    first = sorted((root / "images").glob("*.jpg"))[0]
    shutil.copyfile(first, first.with_name(first.stem + "_copy.jpg"))
    label = root / "labels" / f"{first.stem}.txt"
    shutil.copyfile(label, label.with_name(f"{first.stem}_copy.txt"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from agssp_pipeline.definitions import build_definitions
    from agssp_pipeline.demo import generate_demo
    from agssp_pipeline.orchestration import materialize_selection, prepare_instance

    root = tmp_path_factory.mktemp("lineage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        patch.setenv(CONFIG_ENV_VAR, "")
        (root / "dagster_home").mkdir()
        corpus = generate_demo(root / "demo", seed=0, scale=0.3)
        data = yaml.safe_load(corpus.config_path.read_text())
        data["sources"] = [s for s in data["sources"] if s["name"] != DROPPED_SOURCE]
        downstream = next(s for s in data["sources"] if s["name"] == DOWNSTREAM)
        _copy_a_labelled_image((corpus.config_path.parent / downstream["root"]).resolve())
        data["finetune"]["epochs"] = 1
        data["kead"]["image_size"] = 128  # small frames everywhere: lineage, not accuracy, is under test
        for section in ("backbone", "detector", "finetune"):
            data[section]["image_size"] = 64
        corpus.config_path.write_text(yaml.safe_dump(data))
        config = load_config(corpus.config_path)
        instance = prepare_instance(config, str(corpus.config_path))
        report = materialize_selection(build_definitions(str(corpus.config_path)), config, instance,
                                       selection=" or ".join(f"key:{a}" for a in CHAIN))
        assert not report.failed, "\n".join(report.summary_lines())
        yield {"config_path": str(corpus.config_path), "config": config, "layout": config.layout(),
               "instance": instance}


def _lineage_cli(capsys, *args: str) -> tuple[int, str]:
    code = agssp_main(["lineage", *args])
    return code, capsys.readouterr().out


def _pretrain_sources(chain) -> list[str]:
    return [s.name for s in chain["config"].pretrain_sources()]


def _backbone_run(layout: StorageLayout) -> tuple[str, str]:
    from agssp_pipeline.training.checkpoint import latest_checkpoint_dir, read_latest_pointer

    return read_latest_pointer(layout, "yolov8n")["run_id"], latest_checkpoint_dir(layout, "yolov8n")


def _detector_run(layout: StorageLayout) -> Path:
    from agssp_pipeline.training.checkpoint import latest_checkpoint_dir

    return Path(latest_checkpoint_dir(layout, "yolov8n", kind="detector"))


def test_evaluation_chain_names_sources_maps_and_checkpoints(chain, capsys):
    from agssp_pipeline.kead.store import current_version

    layout = chain["layout"]
    code, text = _lineage_cli(capsys, "finetune_evaluation", "--config", chain["config_path"])
    assert code == 0
    for source in _pretrain_sources(chain):
        assert f"* {source}" in text
        assert current_version(layout.maps_store(source)) in text
    assert DROPPED_SOURCE not in text
    backbone_run_id, _ = _backbone_run(layout)
    assert f"yolov8n run {backbone_run_id}" in text
    assert _detector_run(layout).name in text
    assert "dataset demo_downstream" in text
    # AGBP runs after category_thresholds, so its checkpoint names the table it was made beside
    assert "no threshold table recorded in backbone checkpoint" not in text
    assert "thresholds table" in text
    assert "flags: 0 STALE" in text
    # the stages come upstream first
    titles = ("image sources", "anomaly maps", "category thresholds", "pseudo boxes", "backbone checkpoints",
              "detector checkpoints", "finetune evaluations")
    order = [text.index(f"\n{number}. {title}") for number, title in enumerate(titles, 1)]
    assert order == sorted(order)


def test_json_output_parses_and_carries_dagster_records(chain, capsys):
    code, text = _lineage_cli(capsys, "finetune_evaluation", "--config", chain["config_path"], "--json")
    assert code == 0
    payload = json.loads(text)
    stages = {stage["key"]: stage for stage in payload["stages"]}
    assert list(stages) == ["sources", "maps", "thresholds", "pseudo_boxes", "backbone", "detector", "evaluations"]
    assert payload["summary"] == {STALE: 0, NEWER: 0, MISSING: 0}
    run_id, _ = _backbone_run(chain["layout"])
    # the AGBP run and the mode 2 (distill_weight 0) baseline trained beside it, each found in Dagster
    entries = {e["label"]: e for e in stages["backbone"]["entries"]}
    assert len(entries) == 2
    backbone = entries[f"yolov8n run {run_id}"]
    [domain] = [e for label, e in entries.items() if label != f"yolov8n run {run_id}"]
    assert "made checkpoint run" in domain["dagster"][0]["match"]
    # the Dagster materialisation that made exactly this checkpoint run is found
    record = backbone["dagster"][0]
    assert record["asset"] == "backbone_checkpoint" and record["partition"] == "yolov8n"
    assert run_id in record["match"] and record["run_id"] and record["data_version"]
    runs = {r.run_id for r in chain["instance"].get_runs()}
    assert record["run_id"] in runs
    maps = {e["label"]: e for e in stages["maps"]["entries"]}
    assert set(maps) == set(_pretrain_sources(chain))
    assert all(e["dagster"][0]["asset"] == "anomaly_maps" for e in maps.values())
    version = next(iter(maps.values()))
    assert any(key.startswith("version v") for key in version["fields"])


def test_path_targets_resolve_to_their_artifact(chain):
    layout = chain["layout"]
    detector_dir = _detector_run(layout)
    _, backbone_dir = _backbone_run(layout)
    source = _pretrain_sources(chain)[0]
    cases = {
        str(detector_dir / "model.safetensors"): "detector",
        f"{backbone_dir}/lineage.json": "backbone",
        layout.pseudo_boxes(source): "pseudo_boxes",
        layout.maps_store(source): "maps",
        layout.index(source): "index",
        layout.thresholds(): "thresholds",
        layout.evaluations("finetune", "demo_downstream.per_class"): "evaluation",
        layout.evaluations("kead", MASKED_SOURCE): "kead_evaluation",
        layout.evaluations("box_quality", BOXED_SOURCE): "box_quality",
    }
    for target, kind in cases.items():
        report = build_lineage_report(target, use_dagster=False)  # storage root from the path, no Dagster
        assert report.target_kind == kind, target
        assert report.dagster_home is None
        assert report.storage_root == layout.root
        assert not any(e.dagster for s in report.stages for e in s.entries)
    boxes = build_lineage_report(f"pseudo_boxes[{source}]", chain["config_path"], use_dagster=False)
    assert [e.label for e in boxes.stage("pseudo_boxes").entries] == [source]
    maps = {e.label: e for e in boxes.stage("maps").entries}
    assert "recorded by" in maps[source].fields and f"pseudo boxes {source}" in maps[source].fields["recorded by"]
    # thresholds and boxes record the exact map rows they used (count:digest of image ids), and they hold now
    rows = {name: seen["map rows (count:digest of image ids)"] for name, seen in maps[source].fields["recorded by"].items()}
    assert set(rows) == {"thresholds table", f"pseudo boxes {source}"} and len(set(rows.values())) == 1
    assert int(next(iter(rows.values())).split(":")[0]) > 0 and not boxes.flags()
    # the thresholds table the boxes rest on pooled every pretraining source's maps
    assert set(maps) == set(_pretrain_sources(chain))
    assert boxes.stage("backbone").notes  # downstream of the target is said to be not followed


def test_backbone_target_lists_the_detector_and_evaluations_that_used_it(chain):
    layout = chain["layout"]
    _, backbone_dir = _backbone_run(layout)
    report = build_lineage_report(backbone_dir, chain["config_path"], instance=chain["instance"])
    assert [e.path for e in report.stage("detector").entries] == [str(_detector_run(layout))]
    assert [e.label for e in report.stage("evaluations").entries] == ["dataset demo_downstream"]
    assert not report.stage("pseudo_boxes").entries  # the backbone itself consumed no boxes


def test_duplicate_image_in_the_labelled_set_is_not_stale(chain, capsys):
    """Finetune splits the de-duplicated set; lineage fingerprints it the same way, so a clean run is clean."""
    from agssp_pipeline import artifact_io
    from agssp_pipeline.training.splits import (
        index_fingerprint,
        labelled_set_fingerprint,
        read_split,
        split_path,
    )

    layout = chain["layout"]
    index = artifact_io.read_parquet(layout.index(DOWNSTREAM))
    annotations = artifact_io.read_parquet(layout.annotations(DOWNSTREAM))
    assert int(index["duplicate_of"].notna().sum()) == 1
    _, meta = read_split(split_path(layout, DOWNSTREAM))
    assert meta["fingerprint"] == labelled_set_fingerprint(index, annotations)
    assert meta["fingerprint"] != index_fingerprint(index, annotations)  # the copy and its boxes would count
    code, text = _lineage_cli(capsys, "finetune_evaluation", "--config", chain["config_path"], "--no-dagster",
                              "--fail-on-stale")
    assert code == 0, text
    assert "flags: 0 STALE" in text and f"labelled set fingerprint now: {meta['fingerprint']}" in text


def test_finetune_evaluation_resolves_to_its_table_when_other_evaluations_are_newer(chain):
    layout = chain["layout"]
    later = os.path.getmtime(layout.evaluations("finetune", DOWNSTREAM)) + 60
    for other in (layout.evaluations("kead", MASKED_SOURCE), layout.evaluations("box_quality", BOXED_SOURCE)):
        os.utime(other, (later, later))  # as if kead_evaluation and pseudo_box_quality ran last
    report = build_lineage_report("finetune_evaluation", chain["config_path"], use_dagster=False)
    assert report.target_kind == "evaluation"
    assert [e.label for e in report.stage("evaluations").entries] == [f"dataset {DOWNSTREAM}"]


def test_kead_and_box_quality_evaluations_lead_to_their_maps_and_boxes(chain):
    from agssp_pipeline.kead.store import current_version

    layout = chain["layout"]
    kead = build_lineage_report(f"kead_evaluation[{MASKED_SOURCE}]", chain["config_path"], instance=chain["instance"])
    assert kead.target_kind == "kead_evaluation"
    [entry] = kead.stage("evaluations").entries
    assert entry.label == f"KeAD evaluation {MASKED_SOURCE}"
    assert current_version(layout.maps_store(MASKED_SOURCE)) in entry.fields["evaluated map store versions"]
    assert entry.dagster[0]["asset"] == "kead_evaluation" and entry.dagster[0]["run_id"]
    [maps] = kead.stage("maps").entries
    assert maps.label == MASKED_SOURCE and f"KeAD evaluation {MASKED_SOURCE}" in maps.fields["recorded by"]
    assert not kead.flags()
    quality = build_lineage_report(layout.evaluations("box_quality", BOXED_SOURCE), use_dagster=False)
    assert quality.target_kind == "box_quality"
    assert [e.label for e in quality.stage("pseudo_boxes").entries] == [BOXED_SOURCE]
    assert quality.stage("evaluations").entries[0].fields["pseudo boxes vs ground truth"]
    assert not quality.flags(STALE)
    # the box-quality table records which pseudo-box table it measured (its file hash)
    [boxes] = quality.stage("pseudo_boxes").entries
    seen = boxes.fields["recorded by"][f"box quality {BOXED_SOURCE}"]
    assert seen["table sha256[:16]"] == boxes.fields["table sha256[:16] now"] is not None
    assert not any("does not record the pseudo-box table" in n for n in quality.stage("evaluations").notes)


def test_a_storage_root_on_s3_is_walked_in_the_bucket(chain, moto_s3_server, monkeypatch, tmp_path):
    """The same artifacts copied to a bucket: lineage reads them there (artifact_io), not from local paths."""
    from agssp_pipeline import artifact_io
    from agssp_pipeline.kead.store import current_version

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_s3_server.endpoint}.items():
        monkeypatch.setenv(key, value)
    layout, root = chain["layout"], f"s3://{moto_s3_server.bucket}/store"
    for folder in ("index", "maps.zarr", "pseudo_boxes", "evaluations"):
        artifact_io.upload_tree(layout.path(folder), f"{root}/{folder}")
    artifact_io.write_bytes(f"{root}/thresholds.parquet", artifact_io.read_bytes(layout.thresholds()))
    config_path = Path(chain["config_path"])
    data = yaml.safe_load(config_path.read_text())
    data["storage_root"] = root
    for source in data["sources"]:
        source["root"] = str((config_path.parent / source["root"]).resolve())
    (tmp_path / "agssp.yaml").write_text(yaml.safe_dump(data))

    report = build_lineage_report(f"pseudo_boxes[{BOXED_SOURCE}]", tmp_path / "agssp.yaml", use_dagster=False)
    assert report.storage_root == root
    assert [e.path for e in report.stage("pseudo_boxes").entries] == [f"{root}/pseudo_boxes/{BOXED_SOURCE}.parquet"]
    maps = {e.label: e for e in report.stage("maps").entries}
    assert set(maps) == set(_pretrain_sources(chain))
    assert maps[BOXED_SOURCE].path == f"{root}/maps.zarr/{BOXED_SOURCE}"
    assert maps[BOXED_SOURCE].fields["current version"] == current_version(layout.maps_store(BOXED_SOURCE))
    assert report.stage("thresholds").entries[0].path == f"{root}/thresholds.parquet"
    assert not report.flags()
    kead = build_lineage_report(f"{root}/evaluations/kead/{MASKED_SOURCE}.parquet", use_dagster=False)
    assert kead.target_kind == "kead_evaluation" and kead.storage_root == root
    assert [e.path for e in kead.stage("maps").entries] == [f"{root}/maps.zarr/{MASKED_SOURCE}"]
    assert not kead.flags()


def test_bad_targets_are_clear_errors(chain, tmp_path, capsys):
    with pytest.raises(LineageTargetError, match="no such file"):
        build_lineage_report(str(tmp_path / "nothing.parquet"))
    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(other)
    with pytest.raises(LineageTargetError, match="did not write"):
        build_lineage_report(str(other))
    with pytest.raises(LineageTargetError, match="pass --config"):
        build_lineage_report("detector_checkpoint")
    code = agssp_main(["lineage", "pseudo_boxes[no_such_source]", "--config", chain["config_path"]])
    assert code == 2 and "no artifact of pseudo_boxes[no_such_source]" in capsys.readouterr().err


def test_helpers():
    assert parse_asset_target("pseudo_boxes[a_b]") == ("pseudo_boxes", "a_b")
    assert parse_asset_target("pseudo_boxes:a_b") == ("pseudo_boxes", "a_b")
    assert parse_asset_target("detector_checkpoint") == ("detector_checkpoint", None)
    assert infer_storage_root("/x/store/checkpoints/detector/yolov8n/r1") == "/x/store"
    assert infer_storage_root("/x/store/maps.zarr/src") == "/x/store"
    assert infer_storage_root("/x/store/thresholds.parquet") == "/x/store"
    assert infer_storage_root("/x/elsewhere/model.safetensors") is None


def test_changed_upstream_artifacts_are_flagged_stale(chain, capsys):
    """Runs last: rewrites a map store, the thresholds and the downstream labels in place."""
    from agssp_pipeline.kead.store import read_map_table, write_map_table
    from agssp_pipeline.training.checkpoint import write_latest_pointer

    layout = chain["layout"]
    source = "demo_rolled_voc"
    before = build_lineage_report("detector_checkpoint", chain["config_path"], use_dagster=False)
    assert not before.flags(STALE)
    # a re-run of KeAD with other weights: a new store version becomes current
    table = read_map_table(layout.maps_store(source))
    old_version = table.attrs["version"]
    table.attrs = {k: v for k, v in table.attrs.items() if k != "version"}
    table.attrs["identity"] = {**table.attrs["identity"], "weights": "retrained-weights"}
    new_version = write_map_table(layout.maps_store(source), table)
    assert new_version != old_version
    # thresholds recomputed with another delta
    thresholds = pd.read_parquet(layout.thresholds())
    thresholds["threshold"] = thresholds["threshold"] - 0.05
    thresholds.to_parquet(layout.thresholds(), index=False)
    # a label fixed in the downstream set after the evaluation
    annotations = pd.read_parquet(layout.annotations("demo_downstream"))
    annotations.loc[annotations.index[0], "x2"] = annotations["x2"].iloc[0] + np.float32(3.0)
    annotations.to_parquet(layout.annotations("demo_downstream"), index=False)
    # and a later backbone run
    write_latest_pointer(layout, "yolov8n", "20991231T000000-later")
    # one mapped image of the source leaves its index: the map rows thresholds and boxes used are not current
    index = pd.read_parquet(layout.index(source))
    index[index["image_id"] != str(table.image_id[0])].to_parquet(layout.index(source), index=False)

    report = build_lineage_report("finetune_evaluation", chain["config_path"], use_dagster=False)
    stale: dict[tuple[str, str], str] = {}
    for stage, label, flag in report.flags(STALE):
        stale[(stage, label)] = stale.get((stage, label), "") + "\n" + flag.message
    maps_message = stale[("maps", source)]
    assert f"map store moved to version {new_version} since backbone yolov8n run" in maps_message
    assert f"used {old_version}" in maps_message
    assert "its rows changed since thresholds table used them" in maps_message
    assert f"its rows changed since pseudo boxes {source} used them" in maps_message
    assert "index changed since" in stale[("sources", source)]
    assert ("thresholds", "thresholds table") in stale  # computed from the replaced map version
    assert "thresholds table changed" in stale[("pseudo_boxes", source)]
    assert "labelled set of demo_downstream changed" in stale[("evaluations", "dataset demo_downstream")]
    assert ("maps", "demo_billet_masks") not in stale  # its store was not touched
    newer = [f.message for _, _, f in report.flags(NEWER)]
    assert any("20991231T000000-later" in m for m in newer)
    # Dagster knows of a newer anomaly_maps materialisation than the one the backbone run consumed
    import dagster as dg

    chain["instance"].report_runless_asset_event(dg.AssetMaterialization(
        asset_key="anomaly_maps", partition="demo_billet_masks", tags={"dagster/data_version": "feedfacefeedface"}))
    with_dagster = build_lineage_report("finetune_evaluation", chain["config_path"], instance=chain["instance"])
    billet = next(e for e in with_dagster.stage("maps").entries if e.label == "demo_billet_masks")
    assert billet.dagster[0]["data_version"] == "feedfacefeedface"
    assert any("newer materialisation of anomaly_maps[demo_billet_masks]" in f.message for f in billet.flags)
    index = next(e for e in with_dagster.stage("sources").entries if e.label == "demo_billet_masks")
    assert not index.flags  # image_index was not re-materialised: its recorded Dagster version still holds

    code, text = _lineage_cli(capsys, "finetune_evaluation", "--config", chain["config_path"], "--no-dagster")
    assert code == 0 and "!! STALE: map store moved to version" in text
    payload = json.loads(_lineage_cli(capsys, "finetune_evaluation", "--config", chain["config_path"],
                                      "--no-dagster", "--json")[1])
    assert payload["summary"][STALE] == len(report.flags(STALE))
    assert agssp_main(["lineage", "finetune_evaluation", "--config", chain["config_path"], "--no-dagster",
                       "--fail-on-stale"]) == 1
    capsys.readouterr()
    # a pseudo-box table rewritten after its quality was measured
    boxes = pd.read_parquet(layout.pseudo_boxes(BOXED_SOURCE))
    boxes.iloc[::-1].to_parquet(layout.pseudo_boxes(BOXED_SOURCE), index=False)
    quality = build_lineage_report(f"pseudo_box_quality[{BOXED_SOURCE}]", chain["config_path"], use_dagster=False)
    [rewritten] = quality.stage("pseudo_boxes").entries
    assert any(f"table rewritten since box quality {BOXED_SOURCE}" in f.message for f in rewritten.flags)
    assert any("changed since this was made" in f.message for f in quality.stage("evaluations").entries[0].flags)


def test_deleted_checkpoint_is_missing_and_its_recorded_lineage_still_shown(chain):
    """Runs after the staleness test: moves the detector run away (as a clean-up script might)."""
    layout = chain["layout"]
    detector_dir = _detector_run(layout)
    detector_dir.rename(detector_dir.with_name(detector_dir.name + ".moved"))
    report = build_lineage_report(layout.evaluations("finetune", "demo_downstream"), use_dagster=False)
    missing = [(stage, flag.message) for stage, _, flag in report.flags(MISSING)]
    assert ("detector", f"checkpoint files no longer at {detector_dir}; shown as recorded by its consumer") in missing
    detector = report.stage("detector").entries[0]
    assert detector.fields["weights digest"]  # from the lineage the evaluation table recorded
    # its pseudo-box tables, known only from that recorded lineage, are still followed
    assert {e.label for e in report.stage("pseudo_boxes").entries} == set(_pretrain_sources(chain))
