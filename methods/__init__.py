"""The method interface. Each file in this package implements one paper and provides, in this order:

    '''<paper, venue>; the equations and algorithms it implements; a `Deviations:` list.'''

    @dataclass
    class Settings:                 # the paper's recipe; each field commented with its source (# Sec. 4.1)
        arch: str = "resnet50"      # fields every method has: arch, pretrained, height, width, epochs, P, K
        ...                         # reid.py turns every field into a --field-name option

    SYNTHETIC = dict(...)           # overrides for the CPU recipe on the built-in synthetic world
    SMOKE = dict(...)               # overrides for --smoke (train + evaluate well under a minute on 2 CPU cores)

    def build(settings, num_classes, meta=None) -> nn.Module
        # the model; `meta` holds what train() stored with run.meta(...) (a genotype, searched gates)
    def train(settings, trainset, run) -> nn.Module
        # the whole training, search phases included; `trainset` is a data.TrainSet, `run` a common.Run
    def extract(model, x, modality) -> Tensor
        # (B, d) test features of a normalised image batch x (B, 3, H, W); modality 'v' or 'r'

and optionally

    def distance(model, q_feat, g_feat, settings) -> Tensor
        # (Nq, Ng) test-time distances; default: Euclidean distance of L2-normalised features
    def figures(model, settings, trainset, testset, out)
        # the paper's pictures, written into the directory `out`

reid.py only dispatches through these names; it holds no method logic.
"""
METHODS = ("agw", "nfs", "cmnas", "ssft", "rfm", "mce")
