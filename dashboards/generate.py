#!/usr/bin/env python3
"""Generates the Grafana dashboards in this folder (the JSON files are committed).

    python3 dashboards/generate.py

Edit panels here, regenerate, and run `cargo test --test ops_dashboards`, which checks that
every panel has a query, every query parses as PromQL and uses only families (and label names)
listed in dashboards/metrics.txt. Written for Grafana 10.4 / 11.x (schemaVersion 39).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
NODE = SEL + ', node=~"$node"'
RI = "$__rate_interval"


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def panel(self, ptype, title, targets, unit=None, w=12, h=8, description="", **extra):
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        p = {
            "id": len(self.panels) + 1,
            "type": ptype,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [
                {
                    "refId": chr(ord("A") + i),
                    "datasource": DS,
                    "expr": expr,
                    "legendFormat": legend,
                    **({"instant": True, "format": "table"} if ptype == "table" else {}),
                    **({"format": "heatmap"} if ptype == "heatmap" else {}),
                }
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {},
        }
        if unit:
            p["fieldConfig"]["defaults"]["unit"] = unit
        if ptype == "timeseries":
            p["options"] = {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        if ptype == "stat":
            p["options"] = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background",
                "graphMode": "none",
                "textMode": "value_and_name",
            }
        if ptype == "heatmap":
            p["options"] = {
                "calculate": False,
                "yAxis": {"unit": unit or "s"},
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5},
            }
        if ptype == "state-timeline":
            p["options"] = {"showValue": "auto", "mergeValues": True, "rowHeight": 0.8}
        if ptype == "table":
            p["options"] = {"showHeader": True}
            p["transformations"] = [
                {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
            ]
        for k, v in extra.items():
            if k == "mappings":
                p["fieldConfig"]["defaults"]["mappings"] = v
            elif k == "thresholds":
                p["fieldConfig"]["defaults"]["thresholds"] = {
                    "mode": "absolute",
                    "steps": [{"color": c, "value": val} for val, c in v],
                }
                p["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
            else:
                p[k] = v
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)
        return p

    def row(self, title):
        """A full-width row header; the panels after it start on a new line."""
        if self.x > 0:
            self.y += self.row_h
        p = {
            "id": len(self.panels) + 1,
            "type": "row",
            "title": title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            "panels": [],
        }
        self.panels.append(p)
        self.x, self.y, self.row_h = 0, self.y + 1, 0
        return p

    def json(self):
        return {
            "__inputs": [],
            "__requires": [
                {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
                {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            ],
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["vpnbot"],
            "timezone": "browser",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-3h", "to": "now"},
            "timepicker": {},
            "links": [
                {
                    "type": "dashboards",
                    "tags": ["vpnbot"],
                    "asDropdown": True,
                    "title": "vpnbot",
                    "includeVars": True,
                    "keepTime": True,
                }
            ],
            "annotations": {"list": []},
            "templating": {"list": templating()},
            "panels": self.panels,
        }


def query_var(name, label, query, include_all=True):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
    }


def templating():
    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        },
        query_var("job", "job", "label_values(vpnbot_build_info, job)"),
        query_var("instance", "instance", 'label_values(vpnbot_build_info{job=~"$job"}, instance)'),
        query_var("node", "node", 'label_values(vpnbot_node_api_circuit_state{job=~"$job", instance=~"$instance"}, node)'),
    ]


def q(quantile, metric, by, sel=SEL, window=RI):
    return f"histogram_quantile({quantile}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{window}])))"


STALL_MAP = [
    {"type": "value", "options": {"0": {"text": "ok", "color": "green"}, "1": {"text": "STALLED", "color": "red"}}}
]
BREAKER_MAP = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green"},
            "1": {"text": "half-open", "color": "yellow"},
            "2": {"text": "open", "color": "red"},
        },
    }
]


def overview():
    b = Board("vpnbot-overview", "vpnbot / Overview", "Is vpnbot up, leading, responsive; what is stuck; what pages.")
    b.panel("stat", "Up", [(f'up{{{SEL}}}', "{{instance}}")], w=4, h=5,
            mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "up", "color": "green"}}}])
    b.panel("stat", "Leader", [(f"vpnbot_leader{{{SEL}}}", "{{instance}}")], w=4, h=5,
            mappings=[{"type": "value", "options": {"0": {"text": "follower", "color": "blue"}, "1": {"text": "leader", "color": "green"}}}])
    b.panel("stat", "Runtime stalled", [(f"vpnbot_runtime_stalled{{{SEL}}}", "{{instance}}")], w=4, h=5, mappings=STALL_MAP)
    b.panel("stat", "Scheduler lag p99", [(q(0.99, "vpnbot_runtime_scheduler_lag_seconds", "instance"), "{{instance}}")],
            unit="s", w=4, h=5, thresholds=[(None, "green"), (0.05, "yellow"), (0.25, "red")])
    b.panel("stat", "Bot polling age", [
        (f"(time() - vpnbot_bot_polling_last_success_timestamp_seconds{{{SEL}}}) and on (instance, job) (vpnbot_leader{{{SEL}}} == 1)", "{{instance}}")],
        unit="s", w=4, h=5, description="Seconds since the leader's last completed getUpdates (empty polls count).",
        thresholds=[(None, "green"), (60, "yellow"), (120, "red")])
    b.panel("stat", "Heartbeat age", [(f"vpnbot_runtime_heartbeat_age_seconds{{{SEL}}}", "{{instance}}")],
            unit="s", w=4, h=5, thresholds=[(None, "green"), (0.5, "yellow"), (1, "red")])
    b.panel("stat", "Last reconcile success per node (age)", [
        (f"min by (node) (vpnbot_reconcile_node_last_reconciled_age_seconds{{{NODE}}})", "{{node}}")],
        unit="s", w=12, h=6, thresholds=[(None, "green"), (1200, "yellow"), (1800, "red")])
    b.panel("state-timeline", "Node breakers", [(f"max by (node) (vpnbot_node_api_circuit_state{{{NODE}}})", "{{node}}")],
            w=12, h=6, mappings=BREAKER_MAP)
    b.panel("table", "Open stall episodes (culprit)", [(f"vpnbot_watchdog_episode_info{{{SEL}}} == 1", "")], w=12, h=7,
            description="One row per open watchdog episode: kind, task, node, operation, phase, label. /debug/dump has the evidence.")
    b.panel("table", "Firing alerts", [('ALERTS{alertstate="firing", alertname=~"Vpnbot.+"}', "")], w=12, h=7,
            description="Alerts from alerts/vpnbot.rules.yml firing in this Prometheus.")
    b.panel("timeseries", "Scheduler lag p99", [(q(0.99, "vpnbot_runtime_scheduler_lag_seconds", "instance"), "{{instance}}")], unit="s")
    b.panel("timeseries", "Node call error ratio", [(
        f'sum by (node) (rate(vpnbot_node_api_request_duration_seconds_count{{{NODE}, outcome!="ok"}}[{RI}])) / '
        f"sum by (node) (rate(vpnbot_node_api_request_duration_seconds_count{{{NODE}}}[{RI}]))", "{{node}}")], unit="percentunit")
    return b


def runtime():
    b = Board("vpnbot-runtime", "vpnbot / Runtime", "The main tokio runtime: scheduling, workers, queues, stalls, task families.")
    b.panel("heatmap", "Scheduler lag (heatmap)", [(f"sum by (le) (increase(vpnbot_runtime_scheduler_lag_seconds_bucket{{{SEL}}}[{RI}]))", "{{le}}")],
            unit="s", description="How late the 100 ms probe woke up.")
    b.panel("timeseries", "Scheduler lag p50 / p99, probe first-poll delay p99", [
        (q(0.5, "vpnbot_runtime_scheduler_lag_seconds", "instance"), "p50 {{instance}}"),
        (q(0.99, "vpnbot_runtime_scheduler_lag_seconds", "instance"), "p99 {{instance}}"),
        (q(0.99, "vpnbot_runtime_probe_first_poll_delay_seconds", "instance"), "first-poll p99 {{instance}}"),
    ], unit="s")
    b.panel("timeseries", "Busy ratio per worker", [
        (f"rate(vpnbot_runtime_worker_busy_seconds_total{{{SEL}}}[{RI}])", "worker {{worker}} {{instance}}"),
        (f"vpnbot_runtime_busy_ratio{{{SEL}}}", "all {{instance}}"),
    ], unit="percentunit")
    b.panel("timeseries", "Polls, parks, steals per second", [
        (f"rate(vpnbot_runtime_polls_total{{{SEL}}}[{RI}])", "polls {{instance}}"),
        (f"rate(vpnbot_runtime_parks_total{{{SEL}}}[{RI}])", "parks {{instance}}"),
        (f"rate(vpnbot_runtime_noop_unparks_total{{{SEL}}}[{RI}])", "noop unparks {{instance}}"),
        (f"rate(vpnbot_runtime_steals_total{{{SEL}}}[{RI}])", "steals {{instance}}"),
        (f"rate(vpnbot_runtime_budget_forced_yields_total{{{SEL}}}[{RI}])", "forced yields {{instance}}"),
    ], unit="ops")
    b.panel("timeseries", "Queue depths", [
        (f"vpnbot_runtime_global_queue_depth{{{SEL}}}", "global {{instance}}"),
        (f"vpnbot_runtime_local_queue_depth{{{SEL}}}", "local (all workers) {{instance}}"),
        (f"vpnbot_runtime_blocking_queue_depth{{{SEL}}}", "blocking {{instance}}"),
    ])
    b.panel("timeseries", "Blocking threads and live tasks", [
        (f"vpnbot_runtime_blocking_threads{{{SEL}}}", "blocking threads {{instance}}"),
        (f"vpnbot_runtime_idle_blocking_threads{{{SEL}}}", "idle blocking {{instance}}"),
        (f"vpnbot_runtime_live_tasks{{{SEL}}}", "live tasks {{instance}}"),
        (f"vpnbot_runtime_workers{{{SEL}}}", "workers {{instance}}"),
    ])
    b.panel("timeseries", "Stalls by kind", [
        (f"sum by (kind) (increase(vpnbot_watchdog_stalls_total{{{SEL}}}[{RI}]))", "{{kind}}"),
    ], description="Watchdog episodes started: runtime_stalled, blocked_worker, operation_overdue, pool_starved, worker_overdue.")
    b.panel("timeseries", "Stall duration p99 by kind, heartbeat age", [
        (q(0.99, "vpnbot_watchdog_stall_duration_seconds", "kind"), "p99 {{kind}}"),
        (f"vpnbot_runtime_heartbeat_age_seconds{{{SEL}}}", "heartbeat age {{instance}}"),
    ], unit="s")
    b.panel("state-timeline", "Runtime stalled", [(f"vpnbot_runtime_stalled{{{SEL}}}", "{{instance}}")], mappings=STALL_MAP)
    b.panel("table", "Open stall episodes (culprit)", [(f"vpnbot_watchdog_episode_info{{{SEL}}} == 1", "")])
    b.panel("timeseries", "Slow polls per task family", [
        (f"sum by (task) (rate(vpnbot_task_slow_polls_total{{{SEL}}}[{RI}]))", "{{task}}"),
    ], unit="ops")
    b.panel("timeseries", "Mean poll time per task family", [
        (f"sum by (task) (rate(vpnbot_task_poll_seconds_total{{{SEL}}}[{RI}])) / sum by (task) (rate(vpnbot_task_polls_total{{{SEL}}}[{RI}]))", "{{task}}"),
    ], unit="s")
    b.panel("timeseries", "Mean schedule delay per task family", [
        (f"sum by (task) (rate(vpnbot_task_scheduled_seconds_total{{{SEL}}}[{RI}])) / sum by (task) (rate(vpnbot_task_schedules_total{{{SEL}}}[{RI}]))", "{{task}}"),
    ], unit="s")
    b.panel("timeseries", "Long schedule delays per task family", [
        (f"sum by (task) (rate(vpnbot_task_long_schedule_delays_total{{{SEL}}}[{RI}]))", "{{task}}"),
    ], unit="ops")
    b.panel("timeseries", "Task poll duration p99 (all tasks)", [
        (q(0.99, "vpnbot_runtime_poll_duration_seconds", "instance"), "p99 {{instance}}"),
        (f"vpnbot_runtime_mean_poll_duration_seconds{{{SEL}}}", "mean {{instance}}"),
    ], unit="s")
    b.panel("timeseries", "Watchdog dumps written", [
        (f"sum by (trigger) (increase(vpnbot_watchdog_dumps_total{{{SEL}}}[{RI}]))", "{{trigger}}"),
    ])
    return b


def node_api():
    b = Board("vpnbot-node-api", "vpnbot / Node API", "Calls to the VPN nodes' API: latency per phase, in-flight, errors, retries, breaker.")
    m = "vpnbot_node_api_request_duration_seconds"
    p = "vpnbot_node_api_phase_duration_seconds"
    b.panel("timeseries", "Request latency p50 / p99 by operation", [
        (q(0.5, m, "node, operation", NODE), "p50 {{node}} {{operation}}"),
        (q(0.99, m, "node, operation", NODE), "p99 {{node}} {{operation}}"),
    ], unit="s", description="Whole calls, retries included.")
    b.panel("timeseries", "Phase latency p99 by operation and phase", [
        (q(0.99, p, "node, operation, phase", NODE), "{{node}} {{operation}} {{phase}}"),
        (q(0.5, p, "node, operation, phase", NODE), "p50 {{node}} {{operation}} {{phase}}"),
    ], unit="s", description="connect, headers (request sent until response head), body, decode.")
    b.panel("timeseries", "In flight by phase", [
        (f"sum by (node, operation, phase) (vpnbot_node_api_inflight_requests{{{NODE}}})", "{{node}} {{operation}} {{phase}}"),
    ], description="A call sitting in body after its headers is the predecessor's freeze.")
    b.panel("timeseries", "Errors by type", [
        (f'sum by (node, operation, outcome) (rate({m}_count{{{NODE}, outcome!="ok"}}[{RI}]))', "{{node}} {{operation}} {{outcome}}"),
    ], unit="ops")
    b.panel("timeseries", "Requests per second by outcome", [
        (f"sum by (node, outcome) (rate({m}_count{{{NODE}}}[{RI}]))", "{{node}} {{outcome}}"),
    ], unit="ops")
    b.panel("timeseries", "Retries by reason", [
        (f"sum by (node, operation, reason) (rate(vpnbot_node_api_retries_total{{{NODE}}}[{RI}]))", "{{node}} {{operation}} {{reason}}"),
    ], unit="ops")
    b.panel("state-timeline", "Breaker state", [(f"max by (node) (vpnbot_node_api_circuit_state{{{NODE}}})", "{{node}}")],
            mappings=BREAKER_MAP)
    b.panel("timeseries", "Breaker transitions", [
        (f"sum by (node, state) (increase(vpnbot_node_api_circuit_transitions_total{{{NODE}}}[{RI}]))", "{{node}} → {{state}}"),
    ])
    b.panel("timeseries", "Response body bytes p50 / p99", [
        (q(0.5, "vpnbot_node_api_response_body_bytes", "node, operation", NODE), "p50 {{node}} {{operation}}"),
        (q(0.99, "vpnbot_node_api_response_body_bytes", "node, operation", NODE), "p99 {{node}} {{operation}}"),
    ], unit="bytes", w=24)
    return b


def db_pool():
    b = Board("vpnbot-db-pool", "vpnbot / Database pool", "The instrumented PostgreSQL pool, per call-site label.")
    b.panel("timeseries", "Acquire wait p99 by label", [(q(0.99, "vpnbot_db_pool_acquire_wait_seconds", "label"), "{{label}}")], unit="s")
    b.panel("timeseries", "Hold time p99 by label", [(q(0.99, "vpnbot_db_pool_hold_seconds", "label"), "{{label}}")], unit="s",
            description="Acquire to release. A connection held across an HTTP call shows here.")
    b.panel("timeseries", "Connections used / idle / max", [
        (f"sum by (state) (vpnbot_db_pool_connections{{{SEL}}})", "{{state}}"),
        (f"max(vpnbot_db_pool_max_connections{{{SEL}}})", "max"),
    ])
    b.panel("timeseries", "Pending acquires", [(f"vpnbot_db_pool_pending_acquires{{{SEL}}}", "{{instance}}")])
    b.panel("timeseries", "Acquire timeouts by label", [
        (f"sum by (label) (increase(vpnbot_db_pool_acquire_timeouts_total{{{SEL}}}[{RI}]))", "{{label}}"),
    ])
    b.panel("timeseries", "Acquires per second by label", [
        (f"sum by (label) (rate(vpnbot_db_pool_acquire_wait_seconds_count{{{SEL}}}[{RI}]))", "{{label}}"),
    ], unit="ops")
    b.panel("timeseries", "Database errors by kind", [
        (f"sum by (kind) (increase(vpnbot_db_errors_total{{{SEL}}}[{RI}]))", "{{kind}}"),
    ])
    b.panel("timeseries", "Connections refused by the server, by kind", [
        (f"sum by (kind) (increase(vpnbot_db_connect_errors_total{{{SEL}}}[{RI}]))", "{{kind}}"),
    ], description="SQLSTATE 53300 too_many_connections, 28P01/28000 auth_failed, 57P03 starting_up, "
                   "refused, timeout. While these rise the pool backs off to its existing connections; "
                   "/readyz shows the last one.")
    return b


def reconcile():
    b = Board("vpnbot-reconcile", "vpnbot / Reconcile", "Reconcile of each node's users against the live subscriptions.")
    b.panel("timeseries", "Runs by outcome (per hour)", [
        (f"sum by (node, outcome) (increase(vpnbot_reconcile_runs_total{{{NODE}}}[1h]))", "{{node}} {{outcome}}"),
    ])
    b.panel("timeseries", "Phase durations p99", [
        (q(0.99, "vpnbot_reconcile_phase_duration_seconds", "node, phase", NODE, "1h"), "{{node}} {{phase}}"),
    ], unit="s", description="snapshot, list, diff, recheck, guard, act, record.")
    b.panel("timeseries", "Orphans found (per hour)", [
        (f"sum by (node) (increase(vpnbot_reconcile_orphans_total{{{NODE}}}[1h]))", "{{node}}"),
    ], w=8)
    b.panel("timeseries", "Removed (per hour)", [
        (f"sum by (node) (increase(vpnbot_reconcile_removed_total{{{NODE}}}[1h]))", "{{node}}"),
    ], w=8)
    b.panel("timeseries", "Re-added (per hour)", [
        (f"sum by (node) (increase(vpnbot_reconcile_readded_total{{{NODE}}}[1h]))", "{{node}}"),
    ], w=8)
    b.panel("timeseries", "Guard trips (per hour)", [
        (f'sum by (node) (increase(vpnbot_reconcile_runs_total{{{NODE}, outcome="guarded"}}[1h]))', "{{node}}"),
    ])
    b.panel("timeseries", "Time since last success", [
        (f"min by (node) (vpnbot_reconcile_node_last_reconciled_age_seconds{{{NODE}}})", "{{node}}"),
    ], unit="s", thresholds=[(None, "green"), (1200, "yellow"), (1800, "red")],
        description="Since the node's last ok run by any instance (from the database; VpnbotReconcileNotSucceeding at 30 min).")
    b.panel("timeseries", "Outbox: oldest waiting operation by last error", [
        (f"max by (node, op, error) (vpnbot_outbox_pending_age_seconds{{{NODE}}})", "{{node}} {{op}} {{error}}"),
    ], unit="s", thresholds=[(None, "green"), (300, "yellow"), (900, "red")],
        description="Series only while operations wait; error `none` = not attempted yet (VpnbotOutboxIntentStuck at 15 min).")
    b.panel("timeseries", "Outbox failures by error (per hour)", [
        (f"sum by (node, op, error) (increase(vpnbot_outbox_failures_total{{{NODE}}}[1h]))", "{{node}} {{op}} {{error}}"),
    ], description="The node client's error type; 4xx by the node API contract: uuid_conflict, not_found, bad_request.")
    b.row("Work spread across instances")
    b.panel("timeseries", "Reconcile leases held per instance", [
        (f"sum by (instance) (vpnbot_reconcile_leases_held{{{SEL}}})", "{{instance}}"),
        (f"max(vpnbot_reconcile_live_instances{{{SEL}}})", "live instances"),
    ], w=8, description="Each instance aims at ceil(nodes / live instances) node leases.")
    b.panel("timeseries", "Lease acquisitions, takeovers, losses (per 5 min)", [
        (f"sum by (instance) (increase(vpnbot_reconcile_lease_acquisitions_total{{{SEL}}}[5m]))", "{{instance}} acquired"),
        (f"sum by (instance) (increase(vpnbot_reconcile_lease_takeovers_total{{{SEL}}}[5m]))", "{{instance}} takeover"),
        (f"sum by (instance) (increase(vpnbot_reconcile_lease_losses_total{{{SEL}}}[5m]))", "{{instance}} lost"),
        (f"sum by (instance) (increase(vpnbot_reconcile_lease_releases_total{{{SEL}}}[5m]))", "{{instance}} released"),
    ], w=8, description="Takeover: a lease taken after its holder stopped renewing (died). Released: given up above the fair share or at shutdown.")
    b.panel("timeseries", "Seconds without a lease holder", [
        (f"max by (node) (vpnbot_reconcile_node_unheld_seconds{{{NODE}}})", "{{node}}"),
        (f"max(vpnbot_reconcile_lease_takeover_bound_seconds{{{SEL}}})", "bound"),
    ], unit="s", w=8, description="0 while a live instance holds the node's lease; VpnbotReconcileNodeUnheld above the bound.")
    b.panel("timeseries", "Reconcile runs per instance (per hour)", [
        (f"sum by (instance) (increase(vpnbot_reconcile_runs_total{{{SEL}}}[1h]))", "{{instance}}"),
    ], w=8)
    b.panel("timeseries", "Outbox intents claimed per instance", [
        (f"sum by (instance) (rate(vpnbot_outbox_claimed_total{{{SEL}}}[{RI}]))", "{{instance}}"),
        (f"sum by (instance) (rate(vpnbot_outbox_claim_takeovers_total{{{SEL}}}[{RI}]))", "{{instance}} takeovers"),
    ], unit="ops", w=8, description="Intents claimed with FOR UPDATE SKIP LOCKED; takeovers: claims of a dead instance.")
    b.panel("timeseries", "Expiry claims per instance", [
        (f"sum by (instance, kind) (rate(vpnbot_expiry_claimed_total{{{SEL}}}[{RI}]))", "{{instance}} {{kind}}"),
    ], unit="ops", w=8)
    return b


def bot():
    b = Board("vpnbot-bot", "vpnbot / Bot", "The Telegram bot: updates, handlers, errors, Bot API, polling, webhook, payments.")
    b.panel("timeseries", "Updates per second by kind", [
        (f"sum by (kind) (rate(vpnbot_bot_updates_total{{{SEL}}}[{RI}]))", "{{kind}}"),
    ], unit="ops")
    b.panel("timeseries", "Handler latency p50 / p99", [
        (q(0.5, "vpnbot_bot_handler_duration_seconds", "handler"), "p50 {{handler}}"),
        (q(0.99, "vpnbot_bot_handler_duration_seconds", "handler"), "p99 {{handler}}"),
    ], unit="s")
    b.panel("timeseries", "Errors by kind", [
        (f"sum by (kind) (rate(vpnbot_bot_errors_total{{{SEL}}}[{RI}]))", "{{kind}}"),
    ], unit="ops")
    b.panel("timeseries", "Telegram 429 / 409", [
        (f'sum by (method, outcome) (increase(vpnbot_bot_api_requests_total{{{SEL}, outcome=~"rate_limited|conflict"}}[{RI}]))', "{{method}} {{outcome}}"),
        (f'sum by (kind) (increase(vpnbot_bot_errors_total{{{SEL}, kind=~"rate_limited|conflict"}}[{RI}]))', "errors {{kind}}"),
    ])
    b.panel("timeseries", "Polling age (leader)", [
        (f"(time() - vpnbot_bot_polling_last_success_timestamp_seconds{{{SEL}}}) and on (instance, job) (vpnbot_leader{{{SEL}}} == 1)", "{{instance}}"),
    ], unit="s", thresholds=[(None, "green"), (60, "yellow"), (120, "red")])
    b.panel("timeseries", "Payments (per hour)", [
        (f"sum by (outcome) (increase(vpnbot_bot_payments_total{{{SEL}}}[1h]))", "{{outcome}}"),
    ])
    b.panel("timeseries", "Refunds (per hour)", [
        (f"sum by (source, outcome) (increase(vpnbot_bot_refunds_total{{{SEL}}}[1h]))", "{{source}} {{outcome}}"),
    ], description="telegram: refunded_payment messages; admin: /refund. shortened/ended: days taken back; duplicate, unknown_charge, not_credited: nothing to take; failed/rejected: act.")
    b.panel("timeseries", "Unauthorized polls (401)", [
        (f'sum by (instance) (increase(vpnbot_bot_errors_total{{{SEL}, kind="unauthorized"}}[5m]))', "{{instance}}"),
    ], description="Any value: the bot token is revoked or wrong (VpnbotTelegramUnauthorized).")
    b.panel("timeseries", "Webhook requests by outcome", [
        (f"sum by (outcome) (rate(vpnbot_bot_webhook_requests_total{{{SEL}}}[{RI}]))", "{{outcome}}"),
    ], unit="ops", description="Webhook mode. accepted: handled here; duplicate: handled before; in_progress/slow/overloaded/error: 503, Telegram retries; unauthorized: wrong secret (VpnbotWebhookUnauthorized).")
    b.panel("timeseries", "Webhook work spread and in flight", [
        (f"sum by (instance) (rate(vpnbot_bot_webhook_requests_total{{{SEL}, outcome=\"accepted\"}}[{RI}]))", "accepted {{instance}}"),
        (f"sum by (instance) (vpnbot_bot_webhook_in_flight{{{SEL}}})", "in flight {{instance}}"),
        (q(0.99, "vpnbot_bot_webhook_handling_seconds", "instance"), "p99 s {{instance}}"),
    ], description="Updates handled per instance (the load balancer's spread), requests in flight against telegram.webhook.max_in_flight, answer time p99.")
    b.panel("timeseries", "Duplicates and deduplication rows deleted", [
        (f"sum by (instance) (rate(vpnbot_bot_update_duplicates_total{{{SEL}}}[{RI}]))", "duplicates {{instance}}"),
        (f"sum by (instance) (increase(vpnbot_bot_update_dedup_deleted_total{{{SEL}}}[1h]))", "deleted per hour {{instance}}"),
    ])
    b.panel("timeseries", "Bot API requests by method and outcome", [
        (f"sum by (method, outcome) (rate(vpnbot_bot_api_requests_total{{{SEL}}}[{RI}]))", "{{method}} {{outcome}}"),
    ], unit="ops", w=24)
    return b


def main():
    for make, fname in [
        (overview, "vpnbot-overview.json"),
        (runtime, "vpnbot-runtime.json"),
        (node_api, "vpnbot-node-api.json"),
        (db_pool, "vpnbot-db-pool.json"),
        (reconcile, "vpnbot-reconcile.json"),
        (bot, "vpnbot-bot.json"),
    ]:
        with open(os.path.join(HERE, fname), "w") as f:
            json.dump(make().json(), f, indent=2, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()
