# Sums an `ncu --csv` profile of replayed decode steps per kernel: microseconds per step,
# launches per step, grid size. Steps = launches of KERNEL / COUNT (a kernel that runs COUNT
# times a step, e.g. mla_decode=12 for a model with 12 attention layers: a window of launches
# cuts steps, so a kernel that runs often counts them best).
#   python3 gpu_profile_summary.py PROFILE.csv KERNEL=COUNT
import csv, sys, collections, re
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
head = rows[0]; ki = head.index("Kernel Name"); mi = head.index("Metric Name"); vi = head.index("Metric Value")
dur = collections.defaultdict(float); cnt = collections.Counter(); grid = {}
for r in rows[1:]:
    name = re.sub(r"\(.*", "", r[ki])[:70]
    if r[mi] == "gpu__time_duration.sum":
        dur[name] += float(r[vi].replace(",", "")); cnt[name] += 1
    elif r[mi] == "launch__grid_size":
        grid[name] = r[vi]
kernel, per_step = sys.argv[2].split("=")
steps = max(1e-9, sum(c for n, c in cnt.items() if kernel in n) / float(per_step))
print(f"steps {steps:.2f}, kernels/step {sum(cnt.values())/steps:.1f}, total us/step {sum(dur.values())/steps/1000:.1f}")
for n, d in sorted(dur.items(), key=lambda x: -x[1]):
    print(f"{d/steps/1000:8.1f} us/step  {cnt[n]/steps:5.1f}x  avg {d/cnt[n]/1000:6.1f} us  grid {grid.get(n,'?'):>6}  {n}")
