"""The method interface. Each file in this package implements one paper and provides, in this order:

    '''<paper, venue>; Implements / Readings and choices / Deviations / Released code differs.'''

    @dataclass
    class Settings:                 # the paper's recipe; each field commented with its source (# Sec. 4.1)
        arch: str = "resnet50"      # fields every method has: arch, pretrained, height, width, epochs, P, K
        ...                         # reid.py turns every field into a --field-name option

    RELEASE = dict(...)             # --recipe release: the authors' released code's values, each with file:line
                                    # (None or absent: no code was published, and --recipe release refuses)
    RELEASE_REGDB = dict(...)       # optional: release values that differ on RegDB (on top of RELEASE)
    SYNTHETIC = dict(...)           # overrides for the CPU recipe on the built-in synthetic world (chosen on
                                    # --split val; each override's val evidence in its comment)
    SMOKE = dict(...)               # overrides for --smoke (train + evaluate well under a minute on 2 CPU cores)
    CHOICES = {"field": ("a", "b")} # optional: the values a str setting accepts (reid.py checks them)
    LIMITS = {"field": 1}           # optional: minimum values of numeric settings beyond reid.py's own checks

    def build(settings, num_classes, meta=None) -> nn.Module
        # the model; `meta` is the dict train() filled in run.meta (a genotype, searched gates)
    def objective(model, batch, settings, ...) -> (loss, terms)
        # the paper's total loss on one training batch (its equation in the docstring), `terms` by the paper's
        # names; train() calls it under `with run.autocast():` and bench.py times it; the arguments after
        # `settings` are the method's own state (MCE's memories) or switches (CM-NAS's c3mmd, cls), by keyword
    def train(settings, trainset, run) -> nn.Module
        # the whole training, search phases included; `trainset` is a data.TrainSet, `run` a common.Run
    def extract(model, x, modality) -> Tensor
        # (B, d) test features of a normalised image batch x (B, 3, H, W); modality 'v' or 'r'

and optionally

    def distance(model, q_feat, g_feat, settings) -> Tensor
        # (Nq, Ng) test-time distances; default: Euclidean distance of L2-normalised features
    def figures(model, settings, trainset, testset, out)
        # the paper's pictures, written into the directory `out`

reid.py only dispatches through these names (all but objective); it holds no method logic.
"""
METHODS = ("agw", "nfs", "cmnas", "ssft", "rfm", "mce")
