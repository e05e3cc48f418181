"""The chaos report: what ran, what it did, and every check with its violations."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from chaos.console import fmt_s

if TYPE_CHECKING:
    from chaos.harness import Harness


def race_how(h: Harness) -> Counter:
    return Counter(m.get("how") for m in h.record.submitted.values() if m["phase"] == "race")


def report(h: Harness, jobs, events, violations, info, race, leftovers_dirs, leftover_procs,
           total_s) -> tuple[str, int]:
    from chaos.checks import CHECKS

    rec = h.record
    lines: list[str] = []
    add = lines.append
    add("=" * 100)
    add(f"andon chaos report — seed {h.seed}, {h.plan.workers} workers × {h.plan.concurrency} pool processes, "
        f"{'SQLite' if h.db == 'sqlite' else 'PostgreSQL'}, ran {fmt_s(total_s)}")
    add("=" * 100)
    chaos_ids = set(h.submitted("chaos"))
    deadline_jobs = sum(1 for j in chaos_ids if rec.submitted[j].get("deadline_s"))
    add(f"phase 1 — chaos: {len(chaos_ids)} jobs submitted through the API ({deadline_jobs} with a deadline_s), "
        f"{h.plan.min_docs}–{h.plan.max_docs} items, stage_delay_s {h.plan.min_delay_s}–{h.plan.max_delay_s}; "
        f"{fmt_s(h.phase_times.get('chaos', 0))} + drain {fmt_s(h.phase_times.get('chaos drain', 0))}")
    acts = [a for a in rec.actions if a.job_id in chaos_ids or a.kind in ("sigkill", "supersede_race", "idem_retry")]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for a in acts:
        by_kind[a.kind][a.result.split(" ")[0].rstrip(":") if a.result else "?"] += 1
    add("  actions:")
    for kind in ("api_cancel", "cli_cancel", "flower_revoke", "flower_terminate", "sigkill", "dup_send_task",
                 "dup_flower_apply", "lose_message", "supersede_race", "idem_retry"):
        c = by_kind.get(kind, Counter())
        add(f"    {kind:<18} {sum(c.values()):>4}   " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    per_job = Counter(a.job_id for a in acts if a.kind not in ("sigkill", "dup_send_task", "dup_flower_apply",
                                                                "lose_message", "supersede_race", "idem_retry"))
    kills = Counter(a.job_id for a in acts if a.kind == "sigkill")
    add(f"    jobs asked to stop: {len(per_job)} ({sum(1 for v in per_job.values() if v > 1)} of them by two or "
        f"more harness calls); jobs SIGKILLed: {len(kills)} ({sum(1 for v in kills.values() if v > 1)} twice)")
    for r in rec.restarts:
        add(f"    warm restart of {r['worker']} at {r['share']:.0%} of submits: exit {r['exit_s']:.1f}s "
            f"(code {r['exit_code']}), back under the same name after "
            f"{(r['ready'] - r['began']).total_seconds():.1f}s")
    if rec.redis_restart:
        down, up = rec.redis_restart
        add(f"    Redis restart (SIGTERM, same port and appendonly dir): down {(up - down).total_seconds():.1f}s")
    lines.extend(h.fault_lines())
    if info.get("db-unavailable"):
        add("    jobs a database outage asked to stop (system_shutdown/database_unavailable): " +
            ", ".join(f"{k} {v}" for k, v in sorted(info["db-unavailable"].items())))
    shutdown = info.get("shutdown-requests", Counter())
    if shutdown:
        add("    jobs asked to stop by a warm shutdown: " + ", ".join(f"{k} {v}" for k, v in sorted(shutdown.items())))
    if rec.transient:
        add("    transient errors the harness retried: " +
            ", ".join(f"{k} ×{v}" for k, v in sorted(rec.transient.items())))
    if rec.submit_errors:
        add(f"    submits answered 5xx (retried as new jobs): {len(rec.submit_errors)}: {rec.submit_errors[0][:120]}")
    origin = info.get("origin", Counter())
    add(f"  jobs in the database: {sum(origin.values())} — "
        + ", ".join(f"{k} {v}" for k, v in sorted(origin.items())))
    for phase in ("chaos", "supersede", "idem", "anchor", "auto-resumed", "orphan"):
        outcome = info.get(f"outcome:{phase}")
        if not outcome:
            continue
        add(f"  outcomes ({phase}):")
        for (status, reason, source), n in sorted(outcome.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            add(f"    {status:<10} {reason or '':<18} {source or '':<16} {n:>5}")
    add(f"  untouched jobs (no stop path, no deadline): {info.get('untouched', Counter())['completed']} — all "
        "must end completed")
    for name, title in (("supersede", "supersede races"), ("idempotency", "idempotent retries"),
                        ("policy", f"policy resumes (ANDON_POLICY={h.plan.policy}, max "
                                   f"{h.plan.max_policy_resumes} per chain)")):
        if info.get(name):
            add(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in sorted(info[name].items())))
    if info.get("auto-resume"):
        add(f"  auto-resumed after a warm restart: {info['auto-resume']['resumed']} jobs")
    if info.get("celery-state"):
        add("  Celery result state by row status: " + ", ".join(
            f"{status}→{state} {n}" for (status, state), n in sorted(info["celery-state"].items(), key=str)))
    if info.get("parked"):
        add("  task messages parked in kombu's `unacked` hash after the run (redelivered only after the 12 h "
            "visibility timeout): " + ", ".join(f"row {k} {v}" for k, v in sorted(info["parked"].items())))
    if info.get("results-settled"):
        add("  Celery states written by andon's sweep for jobs whose run couldn't (tasks/results.py): "
            + ", ".join(f"{log} {n}" for log, n in info["results-settled"].items()))
    cleanup = Counter((e.detail or {}).get("errors", ["?"])[0].split(":")[0] + ": " +
                      (e.detail or {}).get("errors", ["?"])[0].split(":")[1].strip()
                      for e in events if e.kind == "cleanup_failed")
    if cleanup:
        add("  cleanup_failed events (recorded, not violations): "
            + ", ".join(f"{k} ×{v}" for k, v in cleanup.items()))
    if info.get("kills"):
        for k, v in info["kills"].items():
            add(f"  kills: {k}: {v}")
    add("")
    add(f"phase 2 — cancel vs complete: {race.get('jobs', 0)} one-item jobs, no delay, each cancelled through the "
        f"service layer with a random reason ({', '.join(f'{k} {v}' for k, v in sorted(race_how(h).items()))}); "
        f"{fmt_s(h.phase_times.get('race', 0))}")
    for key in ("cancelled", "cancelled while queued (never ran)", "cancelled while running (at a checkpoint)",
                "completed", "completed: the cancel came after the end (400)",
                "completed: the cancel lost to completion", "failed", "two terminal states",
                "ended without starting (unexpected)"):
        if race.get(key):
            add(f"    {key:<50} {race[key]:>5}")
    for how in ("at once", "once running", "random offset"):
        split = {k[2]: n for k, n in race.items() if isinstance(k, tuple) and k[1] == how}
        if split:
            add(f"    cancelled {how + ':':<15} " + ", ".join(f"{k} {v}" for k, v in sorted(split.items())))
    add("")
    grouped: dict[str, list] = defaultdict(list)
    for check, job_id, msg in violations:
        grouped[check].append((job_id, msg))
    by_id = {j.id: j for j in jobs}
    kinds: dict[str, list[str]] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.id):
        if ev.job_id in leftovers_dirs:
            kinds[ev.job_id].append(ev.kind + (f"({ev.detail.get('status')})" if ev.kind == "cancel_requested"
                                               and ev.detail else ""))
    for d in leftovers_dirs:
        job = by_id.get(d)
        grouped["temp-dirs"].append((d, f"$ANDON_HOME/tmp/jobs/{d} left behind; job "
                                        f"{job.status if job else '?'}, events {kinds.get(d)}"))
    for p in leftover_procs:
        grouped["processes"].append(("-", p))
    for n in h.notes:
        grouped["harness"].append(("-", n))
    add("checks:")
    for check, meaning in CHECKS.items():
        found = grouped.get(check, [])
        add(f"  {'ok  ' if not found else 'FAIL'} {meaning}" + (f"  — {len(found)} violation(s)" if found else ""))
    total = sum(len(v) for v in grouped.values())
    add("")
    if total:
        add(f"VIOLATIONS: {total}")
        for check, found in grouped.items():
            add(f"  [{check}] {len(found)}:")
            for job_id, msg in found[:8]:
                add(f"    {job_id}: {msg}")
            if len(found) > 8:
                add(f"    ... and {len(found) - 8} more")
    else:
        add("no violations")
    add("=" * 100)
    return "\n".join(lines), total
