"""Active learning: start a loop (a query strategy with its declared options, the initial labels, the
labels each round adds, the rounds, the per-round training config, oracle or human labels) and follow the
loops of this runs folder: the learning curves (test accuracy against labels) per strategy, mean ± std
over loops that differ only by seed; each loop's rounds, the images its rounds picked with their scores and
the class balance of a batch; for a human loop, label the picked images one at a time (ten class buttons,
keys 0–9 as Streamlit button shortcuts) and see how the labels agree with CIFAR-10's. The loop itself is
cifar_core.experiments.active_loop; the charts and controls are ui/active_views.py."""
from __future__ import annotations

import time
import traceback

import streamlit as st

from cifar_core.active import QUERY_STRATEGIES
from cifar_core.config import RunConfig
from cifar_core.data import CLASSES
from cifar_core.experiments import active_loop as al
from cifar_core.experiments.presets import presets
from cifar_core.params import ConfigError, validate_id
from ui import active_views as views
from ui.charts import confusion_chart
from ui.common import data_source, data_status, friendly_errors, get_store
from ui.forms import config_json_editor, param_widget, registry_chooser, registry_params_form

RUNS_URL = "Runs"  # the Runs page's URL path (relative link: keeps any base path)
REFRESH_S = 3
NEW = "active.new"  # the new-loop form's widget keys
SELECTED = "active.selected"
FLASH = "active.flash"
START_ERROR = "active.start_error"
TAB = "active.tab"
TABS = ("Loops", "New loop")
ROUND_PRESET = "active-learning round (fast net, 8 epochs)"
SHOWN_PICKS = 40  # picked images drawn per batch (the most wanted first)

st.set_page_config(page_title="Active learning · CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("Active learning")
st.caption("Which images are worth labelling? A loop trains a model on a few labels, lets a query strategy pick "
           "the unlabeled images it wants labelled next (scored by that model), has them labelled by CIFAR-10 "
           "(oracle) or by you (human), and trains again. Every round is an ordinary background run on the Runs "
           "page; the learning curve is its test accuracy against the number of labels.")

store = get_store()
data = data_status()


# ---- a new loop --------------------------------------------------------------------------------------------

def round_config() -> RunConfig | None:
    """The per-round training config: a preset (the fast net by default) with its epochs and test images
    editable, and the whole config as JSON in an expander."""
    table = {ROUND_PRESET: al.ROUND_DEFAULTS, **presets()}
    names = list(table)
    if st.session_state.get(f"{NEW}.preset") not in names:
        st.session_state[f"{NEW}.preset"] = ROUND_PRESET
    top = st.columns([2, 1, 1], vertical_alignment="bottom")
    name = top[0].selectbox("Start from preset", names, key=f"{NEW}.preset",
                            help="Every round trains this config on its label set (the loop sets label_set, the "
                                 "seed and the name). The training pool is the config's subset.")
    chosen = table[name]
    scalars = RunConfig.scalar_params()
    with top[1]:
        epochs = param_widget(scalars["epochs"], f"{NEW}.{name}.epochs", chosen.get("epochs"), label="Epochs per round")
    with top[2]:
        test_size = param_widget(scalars["test_size"], f"{NEW}.{name}.test_size", chosen.get("test_size", 0),
                                 label="Test images (0 = all)")
    seed = {**chosen, "epochs": epochs, "eval_every": epochs, "test_size": test_size, "label_budget": 0}
    cfg, _ = config_json_editor(seed, NEW, "The per-round config",
                                "Changing the preset or the numbers above starts this text over.")
    if cfg is not None:
        st.caption(f"Each round: **{cfg.model}**, {cfg.epochs} epoch(s), batch {cfg.batch_size}, {cfg.optimizer} lr "
                   f"{cfg.lr:g}, tested on {cfg.test_size or 10000:,} test images; tricks: "
                   f"{', '.join(cfg.key_tricks()) or 'none'}.")
    return cfg


def new_loop_id() -> str:
    return time.strftime("active-%Y%m%d-%H%M%S")


def new_loop_form(existing: set[str]) -> None:
    st.session_state.setdefault(f"{NEW}.loop", new_loop_id())
    loop_id = st.text_input("Loop id", key=f"{NEW}.loop",
                            help="Letters, digits, '-' and '_'. The same id with the same definition continues it.")
    if loop_id in existing:
        st.info(f"A loop named **{loop_id}** exists: starting continues it if the definition is the same; otherwise "
                "choose another id.")
    st.markdown("##### The query strategy")
    with st.container(border=True):
        strategy = registry_chooser(QUERY_STRATEGIES, f"{NEW}.strategy", "margin", "query strategy",
                                    "Which unlabeled images the round's model asks to have labelled next.")
        strategy_params = registry_params_form(QUERY_STRATEGIES, strategy, f"{NEW}.strategy_params.{strategy}")
    st.markdown("##### Labels and rounds")
    loop_values = {}
    for column, param in zip(st.columns(len(al.LOOP_PARAMS)), al.LOOP_PARAMS):
        with column:
            loop_values[param.name] = param_widget(param, f"{NEW}.{param.name}")
    st.markdown("##### Training in each round")
    cfg = round_config()

    errors: list[str] = []
    try:
        validate_id(loop_id, "active-learning loop id")
    except ConfigError as exc:
        errors.append(str(exc))
    spec = None
    if cfg is not None:
        try:
            spec = al.LoopSpec(base=cfg.to_dict(), strategy=strategy, strategy_params=strategy_params,
                               **loop_values).validated()
        except ConfigError as exc:
            errors.append(str(exc))
    for message in errors:
        st.error(message)
    if spec is not None:
        st.caption(f"{spec.rounds} rounds: {spec.initial:,} labels, then {spec.per_round:,} more per round, up to "
                   f"{spec.labels_at(spec.rounds - 1):,}; {spec.labeller} labels.")
    missing = "" if data["ok"] else "CIFAR-10 is missing (see the Home page)."
    st.button("Start the loop", key=f"{NEW}.start", type="primary", icon=":material/model_training:",
              disabled=bool(missing), help=missing or "Create the loop and start a background worker.",
              on_click=start, args=(loop_id, None if errors else spec))
    failed = st.session_state.pop(START_ERROR, None)
    if failed:
        st.error(failed)


def start(loop_id: str, spec: al.LoopSpec | None) -> None:
    """The Start button's callback (it runs before the page, so the Loops tab opens on the new loop)."""
    if spec is None:
        st.session_state[START_ERROR] = "Nothing was started: fix the errors above."
        return
    try:
        al.start_loop(loop_id, spec, store, data_source=data_source())
        pid = al.launch_worker(store, loop_id)
    except ConfigError as exc:
        st.session_state[START_ERROR] = f"Nothing was started: {exc}"
        return
    except Exception as exc:  # never a traceback on the page (it goes to the server log)
        traceback.print_exc()
        st.session_state[START_ERROR] = f"Starting the loop failed: {type(exc).__name__}: {exc}"
        return
    st.session_state[SELECTED] = loop_id
    st.session_state[TAB] = TABS[0]
    st.session_state[f"{NEW}.loop"] = new_loop_id()
    st.session_state[FLASH] = (f"Loop **{loop_id}** started: " + (f"a background worker (pid {pid}) runs it."
                                                                   if pid else "a worker already runs it."))


# ---- following a loop ---------------------------------------------------------------------------------------

def state_text(loop: al.Loop, alive: bool) -> str:
    done = len(loop.curve())
    last = loop.curve()[-1] if done else None
    if loop.state == al.AWAITING:
        return f"Round {done - 1}'s model picked the images below: label them to start round {done}."
    if loop.state == al.COMPLETED:
        return f"Completed: {done} rounds, {views.pct(last['test_acc'])} test accuracy with {last['labels']:,} labels."
    if loop.state == al.FAILED:
        return f"Failed: {loop.error}. **Resume** tries again (a failed run is trained anew)."
    if loop.state == al.STOPPED:
        return "Stopped: no round trains. **Resume** goes on where it stopped."
    doing = "scoring the pool with round {}'s model".format(done - 1) if loop.state == al.SCORING \
        else f"training round {done} of {loop.spec.rounds}"
    if not alive:
        return f"Waiting at {doing}, but no worker runs this loop: **Resume** starts one."
    return f"A worker is {doing} (refreshing every {REFRESH_S} s)."


def controls(loop: al.Loop, alive: bool) -> None:
    box, stop_col, resume_col = st.columns([6, 1, 1], vertical_alignment="bottom")
    with box:
        views.state_box(loop.state, state_text(loop, alive))
    if stop_col.button("Stop", key=f"active.stop.{loop.loop_id}", icon=":material/stop:",
                       disabled=loop.state in (al.COMPLETED, al.STOPPED),
                       help="Stop the loop and cancel its training round."):
        with friendly_errors("Stopping the loop"):
            cancelled = al.stop_loop(store, loop.loop_id)
            st.session_state[FLASH] = f"Loop **{loop.loop_id}** stopped" + (
                f"; cancelled {', '.join(cancelled)}." if cancelled else ".")
            st.rerun()
    resumable = loop.state in (al.FAILED, al.STOPPED) or (loop.state in al.BUSY_STATES and not alive)
    if resume_col.button("Resume", key=f"active.resume.{loop.loop_id}", icon=":material/play_arrow:",
                         disabled=not resumable, help="Go on, with a background worker."):
        with friendly_errors("Resuming the loop"):
            al.resume_loop(store, loop.loop_id)
            pid = al.launch_worker(store, loop.loop_id)
            st.session_state[FLASH] = f"Loop **{loop.loop_id}** resumed" + (
                f": a background worker (pid {pid}) runs it." if pid else ".")
            st.rerun()


def header(loop: al.Loop) -> None:
    spec = loop.spec
    params = ", ".join(f"{k}={v}" for k, v in (spec.strategy_params or {}).items())
    curve = loop.curve()
    cols = st.columns(4)
    cols[0].metric("strategy", spec.strategy, help=QUERY_STRATEGIES.get(spec.strategy).description)
    cols[1].metric("rounds done", f"{len(curve)} / {spec.rounds}")
    cols[2].metric("labels", f"{curve[-1]['labels']:,}" if curve else "—", help="Labeled images of the last finished round.")
    cols[3].metric("test accuracy", views.pct(curve[-1]["test_acc"]) if curve else "—")
    st.caption(f"{spec.labeller} labels · {spec.initial:,} initial + {spec.per_round:,} per round · seed {spec.seed}"
               + (f" · {params}" if params else "") + f" · each round: {spec.base['model']}, {spec.base['epochs']} "
               f"epoch(s) · created {time.strftime('%Y-%m-%d %H:%M', time.localtime(loop.created))}")


def picked_batch(loop: al.Loop) -> None:
    """The images a round picked (most wanted first) with their scores and CIFAR-10 labels, and the class
    balance of the batch; a batch that waits for your labels is not shown here (its labels would give
    the answers away)."""
    waiting = al.awaiting_round(store, loop.loop_id)
    rounds = [k for k in al.picked_rounds(store, loop.loop_id) if k != waiting]
    if not rounds:
        st.caption("The picked images appear when round 0 has finished and the strategy has chosen.")
        return
    k = st.selectbox("Batch picked after round", rounds, index=len(rounds) - 1, key=f"active.batch.{loop.loop_id}")
    picked = al.batch(store, loop.loop_id, k, data_source())
    shown = min(SHOWN_PICKS, len(picked.indices))
    st.markdown(f"**{len(picked.indices):,} images picked by {loop.spec.strategy} with round {k}'s model** "
                f"(the {shown} most wanted shown; caption: score · CIFAR-10's class"
                + (" · your label" if picked.labels is not None and picked.labeller == "human" else "") + ")")
    captions = [f"{views.score_text(s)} · {CLASSES[t]}" for s, t in zip(picked.scores, picked.true_labels)]
    if picked.labels is not None and picked.labeller == "human":
        captions = [f"{c} · {CLASSES[h]}" for c, h in zip(captions, picked.labels)]
    views.image_grid(picked.images[:shown], captions[:shown])
    st.markdown("**Class balance of the batch** (by CIFAR-10's labels)")
    st.altair_chart(views.class_balance_chart(picked.class_counts()), width="stretch")


def draft_keys(loop_id: str, k: int) -> tuple[str, str]:
    return f"active.draft.{loop_id}.{k}", f"active.position.{loop_id}.{k}"


def labelling(loop: al.Loop, k: int) -> None:
    """One picked image at a time, shown large, with a button per class (keys 0–9); Submit once every
    image has a label."""
    picked = al.queried_images(store, loop.loop_id, data_source())
    draft_key, position_key = draft_keys(loop.loop_id, k)
    draft: dict[int, int] = st.session_state.setdefault(draft_key, {})
    n = len(picked.indices)
    position = min(st.session_state.get(position_key, 0), n - 1)
    index = int(picked.indices[position])

    def go(to: int) -> None:
        st.session_state[position_key] = max(0, min(n - 1, to))

    def pick(label: int) -> None:
        draft[index] = label
        unlabelled = [p for p in range(n) if int(picked.indices[p]) not in draft]
        go(next((p for p in unlabelled if p > position), unlabelled[0] if unlabelled else position))

    st.markdown(f"#### Label the images round {k}'s model picked ({len(draft)} of {n} labelled)")
    st.progress(len(draft) / n)
    image_col, buttons_col = st.columns([1, 2])
    with image_col:
        views.large_image(picked.images[position], f"image {position + 1} of {n} · training image {index} · "
                                                   f"score {views.score_text(picked.scores[position])}")
    with buttons_col:
        st.caption("Click the class of the image, or press its key 0–9 (the buttons' shortcuts); the next image "
                   "without a label follows. Back and Next move through the batch to change a label.")
        views.class_buttons("active.label", pick, draft.get(index))
        back, forward, submit_col = st.columns(3)
        back.button("Back", key="active.label.back", icon=":material/arrow_back:", disabled=position == 0,
                    on_click=go, args=(position - 1,), width="stretch")
        forward.button("Next", key="active.label.next", icon=":material/arrow_forward:", disabled=position == n - 1,
                       on_click=go, args=(position + 1,), width="stretch")
        if submit_col.button(f"Submit {n} labels", key="active.label.submit", type="primary", width="stretch",
                             disabled=len(draft) < n, help="Save the labels; the next round trains on them."):
            submitted = False
            with friendly_errors("Saving the labels"):
                al.submit_labels(store, loop.loop_id, dict(draft))
                pid = al.launch_worker(store, loop.loop_id)
                st.session_state[FLASH] = (f"Your {n} labels of round {k}'s batch are saved: round {k + 1} trains on "
                                           "them" + (f" (background worker pid {pid})." if pid else "."))
                for key in draft_keys(loop.loop_id, k):
                    st.session_state.pop(key, None)
                submitted = True
            if submitted:
                st.rerun()


def agreement_section(loop: al.Loop) -> None:
    result = al.agreement(store, loop.loop_id, data_source())
    if not result["images"]:
        return
    st.markdown("**Your labels against CIFAR-10's**")
    left, right = st.columns([1, 2])
    with left:
        st.metric("agreement", views.pct(result["agreement"]),
                  help=f"Of the {result['images']} images you labelled, the share labelled as CIFAR-10 does.")
        st.caption("Per round: " + ", ".join(f"round {k}: {views.pct(v)}" for k, v in result["per_round"].items()))
        chart = confusion_chart(result["confusion"], list(CLASSES), size=320)
        if chart is not None:
            st.altair_chart(chart)
            st.caption("Rows: CIFAR-10's class; columns: your label.")
    with right:
        views.agreement_table(result["rows"])


def show_loop(loop_id: str, live: bool) -> None:
    """One loop (run as a fragment, every REFRESH_S seconds while a worker advances it)."""
    with friendly_errors("Reading the loop"):
        loop = al.read_loop(store, loop_id)
        alive = al.worker_alive(store, loop_id)
        if live and not (alive and loop.state in al.BUSY_STATES):
            st.rerun()  # it settled: redraw the page once, without the timer
        header(loop)
        controls(loop, alive)
        if loop.curve():
            views.curve_table(loop.curve(), RUNS_URL)
        waiting = al.awaiting_round(store, loop_id)
        if waiting is not None:
            with st.container(border=True):
                labelling(loop, waiting)
        picked_batch(loop)
        if loop.spec.labeller == "human":
            agreement_section(loop)


def loops_view(loops: list[al.Loop], problems: dict[str, str]) -> None:
    for message in problems.values():
        st.error(message)
    if not loops:
        st.info("No active-learning loops yet in this runs folder: start one under **New loop** (or run "
                "`python -m cifar_core active --strategy margin --initial 1000 --per-round 1000 --rounds 10`).")
        return
    st.markdown("##### Learning curves")
    chart = views.curves_chart(al.strategy_curves(loops))
    if chart is None:
        st.caption("Appear when a loop's first round has finished.")
    else:
        st.altair_chart(chart, width="stretch")
        st.caption("Test accuracy against the number of labeled images, one line per strategy and settings; loops "
                   "that differ only by their seed are averaged, the band is ± one standard deviation over them.")
    by_id = {loop.loop_id: loop for loop in loops}
    if st.session_state.get(SELECTED) not in by_id:
        wanted = st.query_params.get("loop")
        st.session_state[SELECTED] = wanted if wanted in by_id else loops[0].loop_id
    loop_id = st.selectbox("Loop", list(by_id), key=SELECTED, help="The loops of this runs folder, newest first.",
                           format_func=lambda i: f"{i} · {by_id[i].spec.strategy} · {by_id[i].state}")
    if st.query_params.get("loop") != loop_id:
        st.query_params["loop"] = loop_id
    live = by_id[loop_id].state in al.BUSY_STATES and al.worker_alive(store, loop_id)
    st.fragment(run_every=REFRESH_S if live else None)(show_loop)(loop_id, live)


# ---- the page ------------------------------------------------------------------------------------------------

flash = st.session_state.pop(FLASH, None)
if flash:
    st.success(flash)
if not data["ok"]:
    st.warning(f"{data['message']}\n\nStarting a loop is disabled until CIFAR-10 is found (see the Home page).")
loops, problems = [], {}
with friendly_errors("Listing the loops"):
    loops, problems = al.list_loops(store)
if st.session_state.get(TAB) not in TABS:
    st.session_state[TAB] = TABS[0] if loops else TABS[1]
loops_tab, new_tab = st.tabs(TABS, key=TAB, on_change="rerun")  # stateful: a started loop opens its view
with loops_tab:
    loops_view(loops, problems)
with new_tab:
    new_loop_form({loop.loop_id for loop in loops})
