"""``raytrade decide SYMBOL``: ask the running HTTP endpoint for a decision (and, with ``--execute``, trade it).

It speaks HTTP to ``POST /v1/decisions`` like any client, so it needs neither
Ray nor the cluster: only the endpoint's address and an API key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from cluster.settings import Settings
from raytrade.cli.errors import EXIT_UNAVAILABLE, EXIT_USAGE, UserError


def add_parser(sub: Any) -> None:
    dec = sub.add_parser("decide", help="ask the running endpoint for a decision")
    dec.add_argument("symbol")
    dec.add_argument("--execute", action="store_true", help="trade it (needs a trade key)")
    dec.add_argument("--account", default="default")
    dec.add_argument("--key", default=None, help="API key (default: $RAYTRADE_API_KEY)")
    dec.add_argument("--url", default=None, help="default: http://serve.host:serve.port")


def run(args: argparse.Namespace, settings: Settings) -> int:
    key = args.key or os.environ.get("RAYTRADE_API_KEY")
    if not key:
        raise UserError("no API key: pass --key or set RAYTRADE_API_KEY (`raytrade up` prints a demo key)")
    url = (args.url or f"http://{settings.serve.host}:{settings.serve.port}").rstrip("/") + "/v1/decisions"
    body = json.dumps({"symbol": args.symbol, "execute": args.execute, "account": args.account}).encode()
    req = urllib.request.Request(url, data=body, headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            d = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", "")
        except ValueError:
            detail = ""
        print(f"raytrade: {e.code} from the endpoint: {detail}", file=sys.stderr)
        return EXIT_USAGE if 400 <= e.code < 500 else EXIT_UNAVAILABLE
    except (urllib.error.URLError, OSError) as e:
        print(f"raytrade: cannot reach {url} ({getattr(e, 'reason', e)}); is `raytrade up` running?", file=sys.stderr)
        return EXIT_UNAVAILABLE
    verdict = "approved" if d["risk"]["approved"] else "refused"
    print(f"{d['symbol']}: {d['action']} target {d['target_position']:+.2f} (now {d['current_position']:+.2f}), "
          f"quantity {d['quantity']:g}, confidence {d['confidence']:.2f}, regime {d.get('regime')}")
    print(f"  risk {verdict}: {'; '.join(d['risk']['reasons']) or '-'}")
    for name, m in sorted(d["members"].items()):
        print(f"  {name:<22} position {m.get('position') if m.get('position') is None else round(m['position'], 3)}"
              f"  contribution {m.get('contribution', 0):+.3f}  version {m.get('version')}")
    if d.get("executed"):
        print(f"  order {d['order']}")
    print(f"  decision {d['decision_id']}, last bar seq {d['last_bar']['seq']} at {d['last_bar']['ts']}")
    return 0


COMMANDS = {"decide": run}
