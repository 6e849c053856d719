# A real program with real data, for `memvisor demo` and the analyze tests: CPython building
# records, an index and a JSON blob. Two runs with different seeds are the same program with
# different data: their interpreter pages match exactly, their heaps are similar, not equal.
import collections, json, random, sys

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
n = int(sys.argv[2]) if len(sys.argv) > 2 else 60000
rnd = random.Random(seed)
letters = "abcdefghijklmnopqrstuvwxyz"
words = ["".join(rnd.choice(letters) for _ in range(rnd.randint(3, 10))) for _ in range(2000)]
records = [
    {"id": i, "name": rnd.choice(words), "tags": [rnd.choice(words) for _ in range(4)], "score": rnd.random()}
    for i in range(n)
]
blob = json.dumps(records[: n // 10]).encode()
index = collections.defaultdict(list)
for r in records:
    index[r["name"]].append(r["id"])
print("ready", flush=True)
sys.stdin.read()
