# coatnet_nano_rw_224 img_size=64, Translation(): flat_frac / corr_channelwise differ by ~3.4e-4
import sys; sys.path.insert(0, "/tmp/sweep")
from harness import *
import equifast
m = make_model("coatnet_nano_rw_224", {"img_size": 64})
for fr in (False, True):
    o = run_case("coatnet_nano_rw_224", equifast.Translation(), 64, model=m, verbose=False, force_reference=fr)
    print("force_reference", fr, summary(o)); print(o["worst"].to_string())
