"""The one runner: runs the stages in order, times and reports each, stops at the first failure.

How a stage is timed and reported (`steps`) is shared with `auto`, which runs its candidates through the same
stages; a spec whose format is `auto` is handed to it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.build import auto, steps
from pipeline.build.steps import BuildKey, BuildReport, load_detail, package_detail, record_key, timed
from pipeline.errors import PipelineError
from pipeline.spec.spec import AUTO, Spec


def build(
    spec: Spec, store: Path, device: str | None = None, layout: str = "mar", build_key: BuildKey = None, sign_key: Path | None = None
) -> BuildReport:
    """Build one archive. Raises the stage's PipelineError after recording it in the report's stages.

    `layout`: `mar` writes `<store>/<name>.mar`, `dir` the folder `<store>/<name>/` (same entries).
    `build_key` (see `pipeline.build.cache`) is recorded in the archive's marpipe.json; a callable is called after the
    load stage, whose hash of the checkpoint it reuses. `sign_key`: a private key file; the archive is put in place
    with its signature (`pipeline.store.signing`)."""
    from pipeline.stages import export, load, package, parity

    if spec.export.format == AUTO:  # every candidate format, the fastest packaged: pipeline/build/auto.py
        return auto.build(spec, store, device, layout, build_key, sign_key)
    report = BuildReport(spec=str(spec.source), name=spec.name, format=spec.export.format, precision=spec.export.precision)
    dev = parity.resolve_device(spec, device)
    workdir = steps.workdir(spec.name)
    try:
        loaded = timed(report, "load", lambda: load.run(spec), load_detail)
        exported = timed(report, "export", lambda: export.run(spec, loaded, workdir, dev), steps.export_detail)
        report.compile_s = exported.compile_s
        sources = package.stage_sources(spec, workdir)
        meta = package.metadata(spec, loaded, exported)
        record_key(meta, build_key)
        with package.begin(spec, store, loaded, exported, layout, sign_key) as draft:  # the weights are copied while parity runs
            checked = timed(
                report,
                "parity",
                lambda: parity.run(spec, loaded, workdir, meta, dev, release=True),
                steps.parity_detail(dev),
            )
            report.parity = checked.record()
            packed = timed(
                report,
                "package",
                lambda: package.run(spec, draft, workdir, sources, exported, meta, checked),
                package_detail,
            )
        report.archive, report.digest = str(packed.archive), packed.digest
    except PipelineError as exc:
        report.error, report.exit_code = str(exc), exc.exit_code
        exc.report = report  # the CLI's --report keeps each stage's status of a failed build too
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report
