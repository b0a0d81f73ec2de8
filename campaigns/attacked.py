"""The attacked model of any campaign item, rebuilt from its record (docs/algorithms.md section 13).

Every record lists the bits its attack flipped (T-BFA ``flips``, BFA and random flips
``profile``, TA-LBF ``flips`` of the final layer; :meth:`attacks.base.Attack.recorded_flips`),
and the campaign's ``campaign.json`` names the model it attacked. :func:`rebuild_attacked` loads
that model as the campaign did (:func:`attacks.target.build_target`), flips the same bits in the
same order, checking each bit's value before the flip against the record and the final Hamming
distance against ``bits_changed``, and :func:`save_attacked` writes it as a checkpoint that
``main.py --eval`` and the attack scripts read::

    python rebuild_attacked.py --results runs/r20/attack_tbfa --key s3-t4-r0 --out s3t4.pth.tar
"""

from __future__ import annotations

import json
import os

from attacks import attack_class
from attacks.target import AttackTarget, DataSpec, TargetSpec, build_target
from models.bits import changed_bits, flip_and_record, read_value, snapshot
from models.factory import ModelConfig, ModelFlags
from utils.errors import UserError

from .results import read_records, record_attack


def _campaign(results_dir: str) -> dict:
    path = os.path.join(results_dir, "campaign.json")
    try:
        with open(path, encoding="utf-8") as f:
            campaign = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{results_dir} holds no campaign.json: give a results folder of "
                        f"attack_tbfa.py, attack_talbf.py or attack_bfa.py") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): it cannot say which model "
                        f"was attacked") from None
    if not isinstance(campaign, dict) or not isinstance(campaign.get("source"), str):
        raise UserError(f"{path} does not name the attacked model (no 'source')")
    return campaign


def campaign_spec(campaign: dict, data_dir: str = "data") -> TargetSpec:
    """The target a campaign attacked, from its ``campaign.json``."""
    fmt = campaign.get("number_format") or "trained"
    if fmt != "trained":
        raise UserError(f"the campaign attacked the weights as {fmt}: rebuilding is supported for "
                        f"models attacked as trained (N-bit codes)")
    config = campaign.get("config")
    flags = ModelFlags(**{k: getattr(ModelConfig.from_dict(config), k) for k in
                          ("arch", "bits", "num_classes", "ocm", "code_length", "output_act")},
                       codebook_seed=ModelConfig.from_dict(config).codebook_seed) \
        if isinstance(config, dict) else ModelFlags()
    source = campaign["source"]
    pretrained = source.startswith("torchvision:")
    norm = campaign.get("normalization") or {}
    return TargetSpec(checkpoint=None if pretrained else source, pretrained=pretrained,
                      model=flags, dataset=campaign.get("dataset"), data=DataSpec(data_dir),
                      normalization=norm.get("name") if norm.get("name") in ("dataset", "bfa")
                      else "auto",
                      defenses=tuple(_defense_spec(d) for d in campaign.get("defenses") or ()))


def _defense_spec(record: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in record.items() if k != "name")
    return record["name"] + (":" + params if params else "")


def _record(results_dir: str, key: str) -> dict:
    records = read_records(results_dir)
    for record in records:
        if record["key"] == key:
            return record
    keys = ", ".join(r["key"] for r in records[:8]) + (", ..." if len(records) > 8 else "")
    raise UserError(f"{results_dir} holds no record with key {key!r} (its keys: "
                    f"{keys or 'none'})")


def rebuild_attacked(results_dir: str, key: str, device="cpu") -> tuple[AttackTarget, dict]:
    """``(target with the item's bits flipped, its record)``; UserError when the record and
    the model disagree (another checkpoint at the source path, a record of an earlier
    version)."""
    campaign = _campaign(results_dir)
    record = _record(results_dir, key)
    target = build_target(campaign_spec(campaign), device)
    model, clean = target.model, snapshot(target.model)
    modules = dict(model.named_modules())
    final = next(n for n, m in modules.items() if m is model.final_layer())
    try:
        flips = attack_class(record_attack(record) or "").recorded_flips(record)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise UserError(f"{key}: {e.args[0] if e.args else e}") from None
    # A deployment-time defense checked (and repaired) the model after every iteration, when
    # the accuracy was measured: the replay does the same at each iteration's last flip.
    deployed = [d for d in target.defenses if d.stage == "deployment"]
    rows = record.get("profile") or []
    ends = [i + 1 == len(rows) or rows[i + 1].get("iteration") != rows[i].get("iteration")
            for i in range(len(rows))] if deployed and len(rows) == len(flips) else []
    if deployed and not ends and flips:
        raise UserError(f"{key}: a model behind {', '.join(d.name for d in deployed)} is "
                        f"rebuilt from a profile of iterations, which this record lacks")
    for d in deployed:
        d.check_and_repair(model)  # as before the clean accuracy
    for i, (layer_name, index, bit, before) in enumerate(flips):
        name = layer_name or final
        layer = modules[name]
        if isinstance(index, (list, tuple)):  # (row, column) of the final layer
            index = index[0] * layer.weight.shape[1] + index[1]
        if before is not None and read_value(layer, index) != before:
            raise UserError(f"{key}: {name}[{index}] holds {read_value(layer, index)}, the record "
                            f"says {before}: {campaign['source']} is not the checkpoint this "
                            f"campaign attacked")
        flip_and_record(name, layer, index, bit)
        if ends and ends[i]:
            for d in deployed:
                d.check_and_repair(model)
    expected = record.get("bits_changed")
    if expected is not None and changed_bits(model, clean) != expected:
        raise UserError(f"{key}: the rebuilt model differs from the clean one in "
                        f"{changed_bits(model, clean)} bits, the record says {expected}")
    return target, record


def save_attacked(target: AttackTarget, record: dict, results_dir: str, path: str) -> None:
    """The rebuilt model as a checkpoint of this tool (float weights ``q * step``, its config,
    codebook and normalization), saying which campaign item it is."""
    from models import to_float
    from utils.checkpoint import make_checkpoint, save_checkpoint

    to_float(target.model)
    ckpt = make_checkpoint(target.model, target.config, target.output, target.dataset.name,
                           target.mean, target.std, defenses=target.defenses, epoch=0)
    ckpt["attacked"] = {"results": os.path.abspath(results_dir), "key": record["key"],
                        "attack": record_attack(record), "source": target.source,
                        "bits_changed": record.get("bits_changed")}
    save_checkpoint(ckpt, path)
