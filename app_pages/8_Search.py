"""Search: AutoML over the tricks. Define an Optuna search (a fixed config, the fields to search with
their ranges, the budget, the sampler and the pruner), start a background worker, and follow the study
live: its trials (each an ordinary background run), the best value, the curves the pruner saw, the
optimization history, parallel coordinates and fANOVA importances; train the best config fully. The
search itself is cifar_core.experiments.search; the charts and range widgets are ui/search_views.py."""
from __future__ import annotations

import dataclasses
import time
import traceback

import streamlit as st

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.experiments import search
from cifar_core.experiments.presets import QUICK_PRESET, presets
from cifar_core.params import ConfigError, Param, validate_id
from ui import search_views as views
from ui.common import data_source, data_status, friendly_errors, get_store
from ui.forms import config_json_editor, param_widget, registry_chooser, registry_params_form

RUNS_PAGE = "app_pages/2_Runs.py"
RUNS_URL = "Runs"  # the Runs page's URL path (relative link: keeps any base path)
REFRESH_S = 3
NEW = "search.new"  # the new-search form's widget keys
SELECTED = "search.selected"
FLASH = "search.flash"
START_ERROR = "search.start_error"
TAB = "search.tab"
TABS = ("Live view", "New search")
SEARCH_SUBSET = 10_000  # the source report's random training subset
SEARCH_VAL = 1_000
DEFAULT_FIELDS = ("lr", "label_smoothing")
TRIALS = Param("trials", "int", 20, 1, 100_000,
               help="Trials the study runs (completed and pruned ones count; failed ones are retried).")
MINUTES = Param("time_budget_min", "float", 0.0, 0.0, 1e6,
                help="No new trial starts after this many minutes (0: no time limit). A running trial finishes.")

st.set_page_config(page_title="Search · CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("Search")
st.caption("AutoML over the tricks: an Optuna search over any declared field (learning rate, label smoothing, "
           "an augmentation step, a model option…). Every trial is an ordinary background run on the Runs page; "
           f"its score is the {search.OBJECTIVE}, never the test set. A pruner stops hopeless trials early.")

store = get_store()
data = data_status()


def pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def training_text(base: dict) -> str:
    """The fixed config's training images, in words."""
    if base.get("subset") == "random":
        return f"{base.get('subset_size', 0):,} random training images"
    if base.get("subset") == "per_class":
        return f"{base.get('per_class', 0):,} training images per class"
    return "the whole training set"


def value_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---- a new search ----------------------------------------------------------------------------------

def fixed_config() -> RunConfig | None:
    """The fixed part of every trial's config: a preset on the report's random subset with a validation
    split, its epochs / subset / validation sizes editable, and the whole config as JSON in an expander."""
    table = presets()
    names = list(table)
    if st.session_state.get(f"{NEW}.preset") not in names:
        st.session_state[f"{NEW}.preset"] = QUICK_PRESET
    top = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    name = top[0].selectbox("Start from preset", names, key=f"{NEW}.preset",
                            help="The fields you do not search keep the preset's values. Every trial trains on "
                                 "the same random subset and is scored on the same validation images.")
    chosen = table[name]
    scalars = RunConfig.scalar_params()
    with top[1]:
        epochs = param_widget(scalars["epochs"], f"{NEW}.{name}.epochs", chosen.get("epochs"),
                              label="Epochs per trial")
    with top[2]:
        subset_size = param_widget(scalars["subset_size"], f"{NEW}.{name}.subset_size", SEARCH_SUBSET,
                                   label="Training images (random)")
    with top[3]:
        val_size = param_widget(scalars["val_size"], f"{NEW}.{name}.val_size",
                                chosen.get("val_size") or SEARCH_VAL, label="Validation images")
    seed = {**chosen, "subset": "random", "subset_size": subset_size, "val_size": val_size, "epochs": epochs,
            "eval_every": 1}
    cfg, _ = config_json_editor(seed, NEW, "The fixed config",
                                "Every trial starts from this config and changes only the searched fields. It is "
                                "evaluated every epoch so that the pruner can stop a trial early. Changing the "
                                "preset or the numbers above starts this text over.")
    if cfg is not None:
        st.caption(f"Fixed: **{cfg.model}**, {training_text(cfg.to_dict())}, {cfg.val_size:,} validation images, "
                   f"{cfg.epochs} epoch(s), batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}; tricks: "
                   f"{', '.join(cfg.key_tricks()) or 'none'}.")
    return cfg


def space_key(name: str, base: RunConfig) -> str:
    """A searched field's widget keys; a registry entry's option is keyed by the entry (another model
    declares another range for its dropout)."""
    owner, _, option = name.partition("_params.")
    if option and hasattr(base, owner):
        return f"{NEW}.space.{getattr(base, owner)}.{name}"
    return f"{NEW}.space.{name}"


def space_form(base: RunConfig) -> dict:
    allowed = search.searchable(base)
    key = f"{NEW}.fields"
    current = st.session_state.get(key)
    st.session_state[key] = ([n for n in current if n in allowed] if isinstance(current, list)
                             else [n for n in DEFAULT_FIELDS if n in allowed])
    picked = st.multiselect(
        "Fields to search", list(allowed), key=key, format_func=views.field_option,
        placeholder="Pick one field or more (type to filter)",
        help="Every declared field that can be searched with this fixed config: RunConfig's settings, the "
             "fixed model's and schedule's options, each augmentation step on or off and its options. Each "
             "starts from its declared range; narrow it below.")
    space = {}
    for name in picked:
        with st.container(border=True):
            space[name] = views.range_editor(name, allowed[name], space_key(name, base))
    return space


def strategy_form() -> dict:
    left, right = st.columns(2)
    with left:
        trials = param_widget(TRIALS, f"{NEW}.trials", label="Trials")
    with right:
        minutes = param_widget(MINUTES, f"{NEW}.minutes", label="Time budget (minutes, 0 = none)")
    left, right = st.columns(2)
    with left.container(border=True):
        sampler = registry_chooser(search.SAMPLERS, f"{NEW}.sampler", "tpe", "sampler",
                                   "How the next trial's values are chosen.")
        sampler_params = registry_params_form(search.SAMPLERS, sampler, f"{NEW}.sampler_params.{sampler}",
                                              columns=2)
    with right.container(border=True):
        pruner = registry_chooser(search.PRUNERS, f"{NEW}.pruner", "median", "pruner",
                                  "Which trials are stopped early, from their per-epoch validation accuracy.")
        pruner_params = registry_params_form(search.PRUNERS, pruner, f"{NEW}.pruner_params.{pruner}", columns=2)
    return {"trials": trials, "time_budget_min": minutes, "sampler": sampler, "sampler_params": sampler_params,
            "pruner": pruner, "pruner_params": pruner_params}


def new_study_name() -> str:
    return time.strftime("search-%Y%m%d-%H%M%S")


def new_search_form(existing: set[str]) -> None:
    st.session_state.setdefault(f"{NEW}.study", new_study_name())
    name_col, storage_col = st.columns([1, 2])
    study = name_col.text_input("Study name", key=f"{NEW}.study",
                                help="Letters, digits, '-', '_' and '.'. The same name with the same fixed config "
                                     "and space continues that study.")
    storage = storage_col.text_input(
        "Storage (optional SQLAlchemy URL)", key=f"{NEW}.storage",
        placeholder="empty: a SQLite file in the runs folder",
        help="For workers on several machines, a PostgreSQL URL (postgresql://user:password@host/db); each "
             "machine then runs `python -m cifar_core search-worker --storage URL --study NAME`.")
    if study in existing:
        st.info(f"A search named **{study}** exists in this runs folder: starting continues it if the fixed config "
                "and space are the same (with this budget, sampler and pruner); otherwise choose another name.")

    st.markdown("##### The fixed config")
    base = fixed_config()
    st.markdown("##### What to search")
    space = space_form(base) if base is not None else {}
    if base is None:
        st.caption("Fix the config above to pick the fields to search.")
    st.markdown("##### Budget and strategy")
    strategy = strategy_form()

    errors: list[str] = []
    try:
        validate_id(study, "study name")
    except ConfigError as exc:
        errors.append(str(exc))
    spec = None
    if base is not None:
        try:
            spec = search.SearchSpec(base=base.to_dict(), space=space, **strategy).validated()
        except ConfigError as exc:
            errors += views.problems(exc)
    for message in errors:
        st.error(message)
    if spec is not None:
        st.caption("Searching " + "; ".join(search.iter_dims_text(spec.dimensions())) + ".")
    missing = "" if data["ok"] else "CIFAR-10 is missing (see the Home page)."
    st.button("Start the search", key=f"{NEW}.start", type="primary", icon=":material/travel_explore:",
              disabled=bool(missing), help=missing or "Create the study and start a background worker.",
              on_click=start, args=(study, None if errors else spec, storage.strip() or None))
    failed = st.session_state.pop(START_ERROR, None)
    if failed:
        st.error(failed)


def start(study: str, spec: search.SearchSpec | None, storage: str | None) -> None:
    """The Start button's callback (it runs before the page, so the live view opens on the new study)."""
    if spec is None:
        st.session_state[START_ERROR] = "Nothing was started: fix the errors above."
        return
    try:
        url = search.start_search(study, spec, store, storage, data_source=data_source())
        pid = search.launch_worker(store, study)
    except ConfigError as exc:
        st.session_state[START_ERROR] = f"Nothing was started: {exc}"
        return
    except Exception as exc:  # never a traceback on the page (it goes to the server log)
        traceback.print_exc()
        st.session_state[START_ERROR] = f"Starting the search failed: {type(exc).__name__}: {exc}"
        return
    st.session_state[SELECTED] = study
    st.session_state[TAB] = TABS[0]
    st.session_state[f"{NEW}.study"] = new_study_name()  # the next search gets a name of its own
    st.query_params["study"] = study
    st.session_state[FLASH] = (f"Search **{study}** started in {search.masked(url)}: "
                               + (f"a background worker (pid {pid}) runs its trials." if pid else
                                  "a worker already runs it."))


# ---- following a study -------------------------------------------------------------------------------

@st.cache_data(show_spinner="Computing fANOVA importances…", max_entries=32)
def cached_importances(study: str, storage: str, n_complete: int) -> dict | str:
    """fANOVA importances (or why there are none yet), once per number of completed trials."""
    loaded, _spec = search.load_search(study, storage)
    try:
        return {name: float(value) for name, value in search.importances(loaded).items()}
    except ConfigError as exc:
        return str(exc)


def controls(name: str, manifest: dict, study, spec, summary: dict, alive: bool) -> None:
    """Whether a worker works on the study, and Stop / Resume (with a new trial budget)."""
    storage = manifest["storage"]
    why = search.budget_left(study, spec)
    running = summary["trials"].get("running", 0)
    box, stop_col, stop_now_col, budget_col, resume_col = st.columns([5, 1, 1, 1, 1], vertical_alignment="bottom")
    if alive and summary["stopped"]:
        box.warning("Stopping: the worker finishes its running trial and starts no other.")
    elif alive:
        box.success(f"A worker is running this study (refreshing every {REFRESH_S} s).")
    elif summary["stopped"]:
        box.warning("Stopped from the page: no new trial starts. **Resume** goes on.")
    elif why:
        box.info(f"Finished: {why}. Raise the trial budget and **Resume** to go on.")
    elif running:
        box.info("Trials are running, but no worker started from this runs folder is alive (another machine's "
                 "worker, or one that died: its trial is retried by the next worker).")
    else:
        box.warning("No worker is running this study: **Resume** starts one.")
    if stop_col.button("Stop", key=f"search.stop.{name}", icon=":material/stop:",
                       disabled=summary["stopped"] or not (alive or running),
                       help="No new trial starts; the running ones finish."):
        stopped = False
        with friendly_errors("Stopping the search"):
            search.stop_search(name, storage)
            st.session_state[FLASH] = f"Search **{name}** stopped: its running trial finishes, no other starts."
            stopped = True
        if stopped:
            st.rerun()
    if stop_now_col.button("Stop now", key=f"search.stop_now.{name}", icon=":material/cancel:",
                           disabled=not running,
                           help="Also cancel the trials running from this runs folder (they end failed)."):
        stopped = False
        with friendly_errors("Stopping the search"):
            cancelled = search.stop_search(name, storage, cancel_running_in=store)
            st.session_state[FLASH] = (f"Search **{name}** stopped; cancelled "
                                       + (", ".join(cancelled) if cancelled else "no run (none runs here)") + ".")
            stopped = True
        if stopped:
            st.rerun()
    with budget_col:
        budget = param_widget(TRIALS, f"search.budget.{name}", spec.trials, label="Trial budget")
    if resume_col.button("Resume", key=f"search.resume.{name}", icon=":material/play_arrow:",
                         disabled=alive and not summary["stopped"],
                         help="Start again (with this trial budget) and launch a worker if none is alive."):
        resumed = False
        with friendly_errors("Resuming the search"):
            if budget != spec.trials:  # the same search with a new budget
                search.create_search(name, dataclasses.replace(spec, trials=budget), storage)
            else:
                search.resume_search(name, storage)
            pid = 0 if search.worker_alive(store, name) else search.launch_worker(store, name)
            st.session_state[FLASH] = (f"Search **{name}** resumed"
                                       + (f": a background worker (pid {pid}) runs it." if pid else "."))
            resumed = True
        if resumed:
            st.rerun()


def header(name: str, manifest: dict, study, spec, summary: dict) -> None:
    counts = summary["trials"]
    best = summary["best"]
    done = counts.get("complete", 0) + counts.get("pruned", 0)
    cols = st.columns(6)
    cols[0].metric("best val acc", pct(best["value"]) if best else "—",
                   help=f"Trial #{best['trial']}: {search.OBJECTIVE}" if best else search.OBJECTIVE)
    cols[1].metric("trials done", f"{done} / {spec.trials}", help="Completed and pruned trials, of the budget.")
    for col, state in zip(cols[2:], ("complete", "pruned", "running", "fail")):
        col.metric(views.STATE_WORDS[state], counts.get(state, 0))
    budget = summary["budget"]
    time_text = (f"time budget {budget['time_budget_min']:g} min" if budget["time_budget_min"] else "no time limit")
    sampler_params = ", ".join(f"{k}={v}" for k, v in (spec.sampler_params or {}).items())
    pruner_params = ", ".join(f"{k}={v}" for k, v in (spec.pruner_params or {}).items())
    st.caption(f"Budget: {spec.trials} trials, {time_text}, {budget['elapsed_min']:.1f} min from the first "
               f"worker's start {'to the end' if budget.get('finished') else 'until now'} · sampler **{spec.sampler}**" + (f" ({sampler_params})" if sampler_params else "")
               + f" · pruner **{spec.pruner}**" + (f" ({pruner_params})" if pruner_params else "")
               + f" · storage {search.masked(manifest['storage'])}")
    with friendly_errors("Reading the space"):
        base = spec.base
        st.caption(f"Space: {'; '.join(search.iter_dims_text(spec.dimensions()))} · fixed: {base['model']}, "
                   f"{training_text(base)}, {base['val_size']:,} validation images, {base['epochs']} epoch(s).")
    if best:
        params = " · ".join(f"`{k}` = {value_text(v)}" for k, v in best["params"].items())
        st.markdown(f"**Best so far: trial #{best['trial']}, {pct(best['value'])}** — {params}")


def charts(name: str, manifest: dict, study, frame, curves, best) -> None:
    left, right = st.columns(2)
    with left:
        st.markdown("**Optimization history**")
        chart = views.history_chart(frame, curves)
        if chart is None:
            st.caption("Appears when the first trial reports a value.")
        else:
            st.altair_chart(chart, width="stretch")
            st.caption("Dots: completed trials' values; red steps: the best so far; grey crosses: pruned trials at "
                       "the last value they reported.")
    with right:
        st.markdown("**Intermediate curves**")
        chart = views.curves_chart(curves, None if best is None else best.number)
        if chart is None:
            st.caption("Appears when a trial reports its first epoch.")
        else:
            st.altair_chart(chart, width="stretch")
            st.caption("Validation accuracy per epoch, as the pruner saw it. Pruned trials: grey dashed lines ending "
                       "in a cross; the best trial is drawn thicker. Hover a line for its trial.")
    n_complete = int((frame["state"] == "complete").sum()) if len(frame) else 0
    left, right = st.columns(2)
    with left:
        st.markdown("**Parallel coordinates**")
        if n_complete == 0:
            st.caption("Appears when the first trial completes.")
        else:
            with friendly_errors("The parallel coordinates"):
                st.plotly_chart(views.parallel_figure(study), width="stretch", key=f"search.parallel.{name}")
    with right:
        st.markdown("**Parameter importances (fANOVA)**")
        result = cached_importances(name, manifest["storage"], n_complete)
        if isinstance(result, str):
            st.info(result)
        elif not result:
            st.caption("No parameter to rank.")
        else:
            st.altair_chart(views.importance_chart(result), width="stretch")
            st.caption(f"fANOVA over the {n_complete} completed trials: how much of the validation accuracy's "
                       "variance each parameter explains (a few trials give a rough ranking).")


def train_best(name: str, manifest: dict, study, spec) -> None:
    st.markdown("**Train the best config fully**")
    best = search.best_trial(study)
    if best is None:
        st.caption("Possible once a trial has completed.")
        return
    queued_key = f"search.best.{name}.queued"
    a, b, c = st.columns([1, 2, 2], vertical_alignment="bottom")
    with a:
        epochs = param_widget(RunConfig.scalar_params()["epochs"], f"search.best.{name}.epochs",
                              spec.base.get("epochs"), label="Epochs")
    give_back = b.checkbox("Give the validation images back to training", key=f"search.best.{name}.give_back",
                           help="val_size 0: the run trains on the validation images too; its final numbers are "
                                "then on the test set only.")
    if c.button(f"Train trial #{best.number}'s config", key=f"search.best.{name}.train", icon=":material/rocket_launch:",
                help="Queue one background run with the best trial's config and these epochs."):
        with friendly_errors("Queuing the best config"):
            cfg = search.best_config(study, epochs=epochs, train_on_validation=give_back)
            record = jobs.submit(cfg, store, data_source=manifest.get("data_source") or data_source(),
                                 meta={"search": name, "best_of_search": True})
            st.session_state[queued_key] = record.run_id
    queued = st.session_state.get(queued_key)
    if queued:
        st.success(f"Queued as run **{queued}**.")
        try:
            st.page_link(RUNS_PAGE, label=f"Follow {queued} on the Runs page", icon=":material/monitoring:",
                         query_params={"run": queued})
        except Exception:  # the Runs page is not part of this app (this page run on its own)
            st.caption(f"Runs page: ?run={queued}")


def show_search(name: str, live: bool) -> None:
    """The live view of one study (run as a fragment, every REFRESH_S seconds while it is live)."""
    with friendly_errors("Reading the search"):
        manifest = search.read_manifest(store, name)
        study, spec = search.load_search(name, manifest["storage"])
        alive = search.worker_alive(store, name)
        summary = search.summary(study, spec)
        if live and not (alive or summary["trials"].get("running")):
            st.rerun()  # it settled: redraw the page once, without the timer
        header(name, manifest, study, spec, summary)
        controls(name, manifest, study, spec, summary, alive)
        frame = search.trials_frame(study)
        if frame.empty:
            st.info("No trial yet: a worker starts the first one a few seconds after it starts.")
            return
        if summary["best"] is None:
            st.info("No completed trial yet: the best value, parallel coordinates and importances appear when "
                    "the first trial completes.")
        st.markdown(f"**Trials** ({views.state_counts_text(summary['trials'])})")
        views.trials_table(frame, RUNS_URL)
        st.download_button("Download the trials (CSV)", search.trials_csv(study), file_name=f"{name}-trials.csv",
                           mime="text/csv", key=f"search.csv.{name}", icon=":material/download:",
                           on_click="ignore")
        for _, row in frame[frame["state"] == "fail"].iterrows():
            st.warning(f"trial #{row['trial']} failed (run {row['run_id']}): {str(row['error'] or '')[:400]}")
        best = search.best_trial(study)
        charts(name, manifest, study, frame, search.curves_frame(study), best)
        with st.container(border=True):
            train_best(name, manifest, study, spec)


def live_view(manifests: list[dict]) -> None:
    if not manifests:
        st.info("No searches yet in this runs folder: define one under **New search** (or run "
                "`python -m cifar_core search --space space.json …`).")
        return
    by_name = {m["study"]: m for m in manifests}
    wanted = st.query_params.get("study")
    if wanted in by_name and st.session_state.get(SELECTED) not in by_name:
        st.session_state[SELECTED] = wanted
    if st.session_state.get(SELECTED) not in by_name:
        st.session_state[SELECTED] = manifests[0]["study"]

    def label(name: str) -> str:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(by_name[name].get("created", 0)))
        return f"{name} · created {created}"

    name = st.selectbox("Search", list(by_name), key=SELECTED, format_func=label,
                        help="The searches of this runs folder, newest first.")
    if st.query_params.get("study") != name:
        st.query_params["study"] = name
    live = None
    with friendly_errors("Reading the search"):
        study, spec = search.load_search(name, search.read_manifest(store, name)["storage"])
        live = search.worker_alive(store, name) or bool(search.summary(study, spec)["trials"].get("running"))
    if live is None:  # damaged or unreachable storage: said above
        return
    st.fragment(run_every=REFRESH_S if live else None)(show_search)(name, live)


# ---- the page ----------------------------------------------------------------------------------------

flash = st.session_state.pop(FLASH, None)
if flash:
    st.success(flash)
if not data["ok"]:
    st.warning(f"{data['message']}\n\nStarting a search is disabled until CIFAR-10 is found (see the Home page).")
manifests: list[dict] = []
with friendly_errors("Listing the searches"):
    manifests = search.list_searches(store)
if st.session_state.get(TAB) not in TABS:
    st.session_state[TAB] = TABS[0] if manifests else TABS[1]
live_tab, new_tab = st.tabs(TABS, key=TAB, on_change="rerun")  # stateful: a started search opens the live view
with live_tab:
    live_view(manifests)
with new_tab:
    new_search_form({m["study"] for m in manifests})
