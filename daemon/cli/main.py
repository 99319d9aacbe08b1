"""The ``pacs-triage`` command line."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from daemon.cli.bundle import bundle_app
from daemon.cli.common import ConfigOption
from daemon.cli.common import fail as _fail
from daemon.cli.common import load as _config
from daemon.cli.config import config_app
from daemon.cli.evaluate import register as register_evaluate_commands
from daemon.cli.jobs import echo_queue, studies_app
from daemon.cli.jobs import register as register_job_commands
from daemon.cli.offline import register as register_offline_commands
from daemon.cli.studies import register as register_study_commands
from daemon.config import parse_peer

app = typer.Typer(
    name="pacs-triage",
    help="Automatic triage of CT/MR studies next to a PACS: receive over DICOM, analyse, report back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(bundle_app, name="bundle")

PeerArg = Annotated[str, typer.Argument(help="The peer as AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242.")]
CallingAe = Annotated[
    str | None, typer.Option(help="Our calling AE title (default: ae_title from the config).")
]
TlsCa = Annotated[Path | None, typer.Option(help="Use DICOM TLS, trusting this CA file.", dir_okay=False)]
TlsCert = Annotated[Path | None, typer.Option(help="Client certificate for DICOM TLS.", dir_okay=False)]
TlsKey = Annotated[Path | None, typer.Option(help="Private key of the client certificate.", dir_okay=False)]
Timeout = Annotated[float, typer.Option(help="Network/ACSE/DIMSE timeout in seconds.")]


def _peer(text: str) -> tuple[str, str, int]:
    try:
        return parse_peer(text)
    except ValueError as exc:
        _fail(str(exc), code=2)


@app.command()
def serve(
    config_path: ConfigOption = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=0, help="Worker processes (default: workers.count, 1).")
    ] = None,
) -> None:
    """Run the DICOM receiver, scheduler, dispatchers and workers until SIGTERM/SIGINT.

    With no configuration it listens on port 11112 as PACS_TRIAGE, accepts loopback peers only,
    and keeps its SQLite database and spool under ~/.local/share/pacs-triage (PACS_TRIAGE_HOME).
    The HTTP API and pages listen on 127.0.0.1:8080 ([http] listen); the admin token is created in
    <home>/api-token on first start unless [[http.tokens]] are configured.
    """
    from daemon.cli.database import unreachable
    from daemon.config import ConfigError
    from daemon.http.server import HttpStartError, TokenFileError, http_addons
    from daemon.service.serve import serve as run
    from storage.errors import StorageUnavailable

    config = _config(config_path)
    try:
        run(config, workers=workers, addons=http_addons(config))
    except ConfigError as exc:
        _fail(str(exc), code=2)
    except StorageUnavailable as exc:
        _fail(unreachable(config, exc), code=2)
    except (HttpStartError, TokenFileError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot start: {exc}")


@app.command()
def status(
    config_path: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what is stored, the queue by state and priority, and what is stuck (dead, not routed).

    Read-only: it never creates or upgrades the database (a schema that is behind is reported).
    """
    from daemon.cli.database import existing_node
    from storage.errors import StorageUnavailable
    from storage.models import utcnow
    from storage.stats import counts, queue_summary

    config = _config(config_path)
    with existing_node(config) as node:
        try:
            result = counts(node.sessions)
            queue = queue_summary(node.sessions, utcnow())
        except StorageUnavailable as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({**asdict(result), "queue": asdict(queue)}, indent=2, sort_keys=True))
        return
    typer.echo(
        f"studies    {result.studies}  ({', '.join(f'{k} {v}' for k, v in result.studies_by_state.items())})"
    )
    typer.echo(f"series     {result.series}")
    typer.echo(f"instances  {result.instances}  ({result.bytes_stored / 2**20:.1f} MiB)")
    typer.echo("jobs       " + ", ".join(f"{k} {v}" for k, v in result.jobs.items()))
    echo_queue(queue)


def _tls(ca: Path | None, cert: Path | None, key: Path | None) -> object:
    from daemon.dicom.scu import TlsClient

    if ca is None and cert is None:
        return None
    return TlsClient(ca_certificates=ca, certificate=cert, private_key=key)


@app.command()
def echo(
    peer: PeerArg,
    config_path: ConfigOption = None,
    calling_ae: CallingAe = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Verify DICOM connectivity to a peer (C-ECHO)."""
    from daemon.dicom.scu import AssociationFailed, Peer, TlsClient
    from daemon.dicom.scu import echo as c_echo

    config = _config(config_path)
    peer_ae, host, port = _peer(peer)
    tls = _tls(tls_ca, tls_cert, tls_key)
    assert tls is None or isinstance(tls, TlsClient)
    try:
        code = c_echo(
            Peer(peer_ae, host, port), calling_ae=calling_ae or config.ae_title, tls=tls, timeout=timeout
        )
    except AssociationFailed as exc:
        _fail(str(exc))
    if code != 0:
        _fail(f"C-ECHO to {peer} answered 0x{code:04X}")
    typer.echo(f"C-ECHO to {peer}: success")


@app.command()
def send(
    peer: PeerArg,
    paths: Annotated[
        list[Path], typer.Argument(help="DICOM files or folders (searched recursively).", exists=True)
    ],
    config_path: ConfigOption = None,
    calling_ae: CallingAe = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    timeout: Timeout = 60.0,
) -> None:
    """Send DICOM files to a peer (C-STORE) and report the status of each file.

    Files are sent byte-for-byte in their own transfer syntax. Exit code 0 when every file was
    accepted, 1 otherwise.
    """
    from daemon.dicom.scu import Peer, TlsClient, send_files

    config = _config(config_path)
    peer_ae, host, port = _peer(peer)
    tls = _tls(tls_ca, tls_cert, tls_key)
    assert tls is None or isinstance(tls, TlsClient)
    ok = failed = 0
    for result in send_files(
        Peer(peer_ae, host, port), paths, calling_ae=calling_ae or config.ae_title, tls=tls, timeout=timeout
    ):
        code = "------" if result.status is None else f"0x{result.status:04X}"
        word = "OK    " if result.ok else "FAILED"
        detail = f"  {result.comment}" if result.comment else ""
        typer.echo(f"{word} {code} {result.path}{detail}")
        ok, failed = (ok + 1, failed) if result.ok else (ok, failed + 1)
    typer.echo(f"{ok} sent, {failed} failed", err=True)
    if failed or not ok:
        raise typer.Exit(1)


@app.command()
def phantom(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the series into (created).", file_okay=False)
    ],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same study, UIDs included.")] = 0,
    lesions: Annotated[int, typer.Option(min=0, max=20, help="Number of lesions (0 = lesion-free).")] = 1,
    slices: Annotated[int, typer.Option(min=8, max=1000, help="Number of axial slices.")] = 64,
    small: Annotated[bool, typer.Option(help="Lesions of 0.2-2 mL instead of the default 2-30 mL.")] = False,
    faint: Annotated[
        bool, typer.Option(help="Fainter lesions: 15-40 HU of contrast instead of 40-80.")
    ] = False,
    cases: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Write a labelled validation set of N studies (for `evaluate`)."),
    ] = None,
    positive_fraction: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="With --cases: the share of cases with lesions (the rest lesion-free)."
        ),
    ] = 0.5,
) -> None:
    """Write a synthetic CT study with lesions of known volume, plus its ground truth.

    The series is real CT Image Storage (512x512, valid UIDs); ground_truth.json lists each
    lesion's centre (LPS, mm) and volume (mL); ground_truth_mask.npy is the voxel mask.

    With --cases N it writes a validation set instead: OUT/cases/case_NNN/ (one study each, seeds
    SEED..SEED+N-1), OUT/truth/case_NNN.nii.gz (lesion masks) and OUT/truth/labels.csv (1 lesion,
    0 lesion-free; --positive-fraction sets the balance; --lesions is then the most per case).
    Try it: `pacs-triage evaluate demo OUT/cases --truth OUT/truth --out REPORT`.
    """
    from pipeline.demo.phantom import PhantomOptions, write_phantom_series

    if small and faint:
        _fail("choose --small or --faint, not both", code=2)
    options = PhantomOptions.small_lesions() if small else PhantomOptions.faint_lesions() if faint else None
    if cases is not None:
        from pipeline.demo.validation_set import write_validation_set

        written = write_validation_set(
            out, cases=cases, positive_fraction=positive_fraction, seed=seed, slices=slices,
            max_lesions=max(lesions, 1), options=options,
        )  # fmt: skip
        positive = sum(1 for case in written if case.lesions)
        typer.echo(
            f"wrote {len(written)} cases to {out}/cases ({positive} with lesions, {len(written) - positive} lesion-free)"
        )
        typer.echo(f"truth: {out}/truth/case_NNN.nii.gz and {out}/truth/labels.csv")
        return
    truth = write_phantom_series(out, seed=seed, lesions=lesions, slices=slices, options=options)
    typer.echo(f"wrote {slices} CT slices to {out} (study {truth.study_instance_uid})")
    for lesion in truth.lesions:
        centre = ", ".join(f"{c:.1f}" for c in lesion.centre_lps)
        typer.echo(f"  lesion {lesion.label}: {lesion.volume_ml:.2f} mL at ({centre}) mm LPS")


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="Phantom seed (the same seed, the same study).")] = 26,
    lesions: Annotated[int, typer.Option(min=0, max=5, help="Lesions in the phantom (0: lesion-free).")] = 1,
    slices: Annotated[int, typer.Option(min=16, max=600, help="Axial slices of the phantom.")] = 64,
    quiet: Annotated[float, typer.Option(min=0, help="Completion quiet period in seconds.")] = 2.0,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the SR.")] = 300.0,
    home: Annotated[
        Path | None,
        typer.Option(help="Keep the demo's data (database, spool, mock PACS files) here.", file_okay=False),
    ] = None,
    bundle_dir: Annotated[
        Path | None,
        typer.Option(
            help="Demo bundles to use (default: the trained ones shipped with pacs-triage).",
            file_okay=False,
            exists=True,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the service's log.")] = False,
) -> None:
    """Run the whole product once, locally: phantom CT in, TID 1500 SR back, checked against the truth.

    Starts a mock PACS (a real pynetdicom C-STORE SCP), the service (receiver, scheduler, one worker) with embedded defaults in a temporary data directory, and routes CT to the "demo" pipeline (phantom-trained MONAI bundles). It sends a synthetic abdominal CT with lesions of known volume, waits for the SR at the mock PACS, and prints the findings next to the ground truth and the time each stage took.

    Your --config and PACS_TRIAGE_* settings are not used: the demo never touches a real database, spool or PACS.

    Exit status: 0 when the SR arrived, lies in the same study, references every image, has a total lesion volume within 15 % of the truth and the expected priority; 1 otherwise; 3 when the trained demo bundles are not there.
    """
    from daemon.demo.run import DemoOptions, run_demo

    code = run_demo(
        DemoOptions(
            seed=seed,
            lesions=lesions,
            slices=slices,
            quiet_seconds=quiet,
            timeout_seconds=timeout,
            home=home,
            bundle_dir=bundle_dir,
            verbose=verbose,
        ),
        echo=typer.echo,
    )
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade(config_path: ConfigOption = None) -> None:
    """Apply the database migrations (also done by every start of `serve` and `worker`)."""
    from daemon.cli.database import unreachable
    from daemon.service.node import open_node
    from storage.errors import StorageUnavailable
    from storage.migrate import current_revision

    config = _config(config_path)
    try:
        node = open_node(config, open_spool=False)
        typer.echo(f"database at revision {current_revision(node.engine)}")
        node.close()
    except StorageUnavailable as exc:
        _fail(unreachable(config, exc), code=2)


@db_app.command("backup")
def db_backup(
    target: Annotated[
        Path, typer.Argument(help="The backup file to write (must not exist).", dir_okay=False)
    ],
    config_path: ConfigOption = None,
) -> None:
    """Copy the SQLite database to PATH while the service runs (SQLite's online backup API).

    The copy is consistent (one moment, WAL included), written to PATH.partial, checked, fsynced
    and renamed. Back up the spool directory too (README "Backup and restore"). For PostgreSQL
    use pg_dump: this command says how and exits 2.
    """
    from daemon.cli.database import shown_url, sqlite_path
    from storage.backup import BackupError, backup_sqlite

    config = _config(config_path)
    source = sqlite_path(config)
    if source is None:
        _fail(
            f"the database is {shown_url(config)}, not SQLite: back it up with "
            f"`pg_dump --format=custom --file {target} DBNAME` (restore: `pg_restore --clean -d DBNAME "
            f'{target}`); see README "Backup and restore"',
            code=2,
        )
    if not source.is_file():
        _fail(f"no database at {source} (home {config.home}); check --config / PACS_TRIAGE_HOME")
    try:
        size = backup_sqlite(source, target)
    except BackupError as exc:
        _fail(str(exc))
    typer.echo(f"backed up {source} to {target} ({size / 2**20:.1f} MiB)")


register_job_commands(app)
register_study_commands(studies_app)
register_offline_commands(app)
register_evaluate_commands(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
