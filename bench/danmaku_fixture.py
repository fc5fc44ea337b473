#!/usr/bin/env python3
"""Realistic danmaku blocks for the compression bench (bench/deflate.sh), deterministic.

Writes BLOCKS lines to two files: `barrage.ndjson`, one publish batch per line for barrage's
`POST /v1/publish` (chat lines in Chinese and English, gifts, PK score corrections coalesced by
key, the odd system notice), and `peer.txt`, the same messages of each block as one JSON array
per line for a broadcast peer that sends each line as one message (uWebSockets.js).

Usage: danmaku_fixture.py OUT_DIR [BLOCKS] [PER_BLOCK]
"""
import json
import os
import random
import sys

out = sys.argv[1]
blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 400
per_block = int(sys.argv[3]) if len(sys.argv) > 3 else 20
rnd = random.Random(17)

CHAT_ZH = [
    "666666", "主播好", "哈哈哈哈哈哈", "前方高能", "这波操作太秀了", "来了来了", "主播今天状态不错",
    "求BGM", "这是什么神仙操作", "笑死我了", "爷青回", "awsl", "打卡", "第一次来，关注了",
    "弹幕护体", "好家伙", "太强了吧", "下饭操作", "主播能不能唱首歌", "支持支持", "稳住别浪",
    "这个配合绝了", "我直接好家伙", "晚上好各位", "蹲一个回放", "刚下班赶上了",
]
CHAT_EN = [
    "lol", "gg", "insane play", "that was clean", "first time here, followed", "W streamer",
    "no way", "POG", "clip it!", "hello from Brazil", "what song is this?", "let's gooo",
    "can't believe that", "KEKW", "this is the best stream today", "GG WP",
]
NAMES = ["小明", "阿杰", "momo", "Kevin", "星河", "lucky_cat", "夜猫子", "Sakura", "老王", "pixel", "风起", "Echo"]
GIFTS = [("rocket", 500), ("carnival", 3000), ("heart", 1), ("lollipop", 10), ("sports_car", 1200), ("star", 50)]


def user():
    return f"{rnd.choice(NAMES)}{rnd.randint(1, 9999)}"


def chat():
    line = rnd.choice(CHAT_ZH if rnd.random() < 0.7 else CHAT_EN)
    if rnd.random() < 0.2:
        line += " " + rnd.choice(["[doge]", "[笑哭]", "[赞]", "!!!", "~~"])
    return {"type": "chat", "text": line, "sender": user()}


def gift():
    name, price = rnd.choice(GIFTS)
    count = rnd.choice([1, 1, 1, 3, 10, 66])
    body = json.dumps({"gift": name, "count": count, "price": price, "combo": rnd.randint(1, 30)}, separators=(",", ":"))
    return {"type": "gift", "priority": "high", "weight": price * count, "text": body, "sender": user()}


score = [0, 0]


def pk():
    score[0] += rnd.randint(0, 800)
    score[1] += rnd.randint(0, 800)
    body = json.dumps({"pk": "r0-vs-r9", "left": score[0], "right": score[1], "ends_in_s": rnd.randint(1, 300)}, separators=(",", ":"))
    return {"type": "pk", "text": body, "coalesce_key": "pk"}


os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "barrage.ndjson"), "w") as b, open(os.path.join(out, "peer.txt"), "w") as p:
    for i in range(blocks):
        items = [chat() for _ in range(per_block - 3)] + [gift(), gift(), pk()]
        if i % 25 == 0:
            items[0] = {"type": "notice", "priority": "whitelist", "text": "系统提示：请文明发言 / please keep the chat friendly"}
        rnd.shuffle(items)
        b.write(json.dumps([dict(it, room="r0") for it in items], ensure_ascii=False, separators=(",", ":")) + "\n")
        p.write(json.dumps(items, ensure_ascii=False, separators=(",", ":")) + "\n")
