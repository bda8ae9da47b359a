"""The config schema: one typed section per component (defaults = the authors' CIFAR-10 settings).

`advcl_dist.config` loads, extends (one section per registered method), validates and writes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class UserError(Exception):
    """A problem the user fixes (a value, a file, the disk): the CLIs print it as one line and exit 2."""


class ConfigError(UserError, ValueError):
    """A configuration problem (a key, a value, a file it names), reported before any work starts."""


@dataclass
class DataConfig:
    name: str = "cifar10"  # digits | cifar10 | cifar100 | stl10 | imagefolder
    split: str = "train"
    root: str | None = None  # folder holding the dataset files (not needed for digits)
    download: bool = False  # fetch the dataset into `root` when missing
    image_size: int | None = None  # resize + centre-crop base images to this side (variable-size data)
    workers: int = 4  # per rank: DataLoader worker processes (torchvision) or FFCV decode threads (ffcv)
    format: str | None = None  # ffcv | torchvision; null: ffcv when data.beton is set, else torchvision
    beton: str | None = None  # FFCV file of data.name/data.split, from tools/write_ffcv.py
    os_cache: bool = True  # FFCV: the OS page cache holds the file for all ranks of a node (false: per process)
    # imagefolder: decode every image once before training and stop naming each unreadable (or, without
    # data.image_size, odd-sized) file; off by default (a full pass over the data)
    scan: bool = False


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # resnet18 | resnet34 (CIFAR stem) | resnet50 (torchvision, ImageNet-size)
    width: int = 64  # first-stage channels of the CIFAR ResNets; 64 is the standard ResNet-18
    proj_dim: int = 128
    proj_hidden: int | None = None  # hidden width of the projection head; null = feature width
    # Backbone weights at the start: kaiming_fan_out (convs kaiming-normal, fan_out, relu; BN weight 1, bias 0:
    # the authors' models/resnet_cifar_multibn_ensembleFC.py, ResNet.__init__) | torch (PyTorch's defaults)
    init: str = "kaiming_fan_out"


@dataclass
class ViewsConfig:
    size: int = 32  # output side of every view
    crop_scale_min: float = 0.2  # RandomResizedCrop scale (min, 1) for t1, t2
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    padding: int = 4  # RandomCrop padding of the attacked view x


@dataclass
class AttackConfig:
    """One L∞ threat model for pretraining, finetuning and evaluation; only the step counts differ."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 5  # PGD steps of the pretraining attacks (δ, δ_ce)
    supervised_steps: int = 10  # PGD-10 of ALF, of AFF's TRADES inner loop and of the supervised_at baseline
    eval_steps: int = 20  # PGD-20 of the reported robust accuracy (RA)
    random_start: bool = True
    # Pretraining only: ε and the step size grow linearly from 1/n to their values over the first n steps
    # of this many epochs (attacks.ramp). 0 = the paper's constant ε from the first step.
    eps_ramp_epochs: float = 0.0


@dataclass
class LossConfig:
    temperature: float = 0.5
    # The authors' SupCon loss multiplies by temperature / base_temperature (0.5 / 0.07);
    # kept by default to reproduce their loss scale. null turns the factor off.
    base_temperature: float | None = 0.07


@dataclass
class PseudoConfig:
    labels: str | None = None  # pseudo_labels.npy, [N, len(ks)] int, row i = dataset index i
    ks: list[int] = field(default_factory=lambda: [2, 10, 50, 100, 500])
    # f_pre for the clustering stage: a checkpoint.pt of ours or a torchvision ResNet-50 state dict;
    # the pipeline's SimCLR run when null
    fpre: str | None = None
    # side f_pre sees: the images are resized (bilinear, antialiased) to fpre_size × fpre_size before it, e.g.
    # 224 for an ImageNet ResNet-50; null = the images as pretraining sees them (views.size)
    fpre_size: int | None = None
    iters: int = 20  # k-means iterations
    init: str = "kmeans++"  # kmeans++ (over a global sample) | random (rows drawn by global index)
    init_sample_per_k: int = 256  # k-means++ runs on min(N, this × K) rows drawn by global index
    pca: int | None = None  # project the L2-normalised features onto this many principal components (null: off)
    pca_whiten: bool = True  # divide each component by its standard deviation (DeepCluster), then L2-normalise


@dataclass
class OptimConfig:
    lr: float = 0.5  # for the global batch size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    min_lr: float = 5e-4  # end of the cosine
    warmup_epochs: float = 10  # linear warm-up, updated every step
    warmup_start_lr: float = 0.01


@dataclass
class TrainConfig:
    method: str = "advcl"  # a registered method (advcl_dist.methods.METHODS)
    label: str | None = None  # the name results and checkpoints carry (the pipeline: a variant's); null = method
    plugins: list[str] = field(default_factory=list)  # modules or .py files registering more methods
    epochs: int = 1000
    batch_size: int = 512  # global: divided over ranks
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32 ("off" would read as a YAML bool)
    # NHWC weights in training and evaluation. null: on GPU only; true: also on CPU, where oneDNN's NHWC
    # convolutions are faster but its batch-norm backward sums less precisely (docs/benchmarks.md)
    channels_last: bool | None = None
    ckpt_every: int = 500  # steps between checkpoints (also written at the end)
    log_every: int = 50  # steps between metric lines / TensorBoard points
    engine: str = "ddp"  # ddp (torch DistributedDataParallel; plain module on one process) | deepspeed
    sync_bn: bool = False  # BN statistics over all ranks (SyncBN); default per-rank, as the authors train
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2 (engine=deepspeed)


@dataclass
class FinetuneConfig:
    """SLF / ALF / AFF on top of a pretrained encoder (defaults: the authors' CIFAR-10 settings)."""

    mode: str = "slf"  # slf (linear, clean) | alf (linear, PGD examples) | aff (whole network, TRADES)
    checkpoint: str | None = None  # the pretraining checkpoint.pt to finetune
    dataset: str | None = None  # finetuning/test dataset; null = data.name (another name = transfer)
    root: str | None = None  # its root; null = data.root
    bn_branch: str = "pgd"  # BN branch the encoder uses (the authors' choice); one-branch models ignore it
    beton: str | None = None  # FFCV file of the finetuning set's train split (tools/write_ffcv.py)
    epochs: int = 25
    batch_size: int = 512
    lr: float | None = None  # null = 0.01 for slf/alf, 0.1 for aff
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: list[int] = field(default_factory=lambda: [15, 20])  # epochs where lr is multiplied by gamma
    gamma: float = 0.1
    trades_beta: float = 6.0
    val_fraction: float = 0.0  # > 0: hold out this share of the training set and keep the epoch with best val RA


@dataclass
class EvalConfig:
    checkpoint: str | None = None  # classifier to evaluate (tools/evaluate.py); null = <out_dir>/classifier.pt
    batch_size: int = 512
    autoattack: bool = True  # AA with pyautoattack "standard" (APGD-CE, APGD-T, FAB-T, Square)
    aa_n: int | None = None  # AutoAttack on n test images chosen by eval.aa_subset; null = all
    aa_subset: str = "stratified"  # which n: a seeded class-stratified sample, or "first" (the first n in file order)
    aa_seed: int = 0  # the stratified sample's seed: the same images for every method and seed of a sweep
    aa_indices: str | None = None  # file of the AA images (index or <class>/<file> lines, .npy); wins over aa_subset
    curves: bool = False  # gradient-masking checks on the AA images: RA vs ε and vs PGD steps, Square (masking.py)
    square_queries: int = 5000  # queries of the curves' black-box Square attack (AutoAttack's own: 5000)
    seed: int = 0  # PGD random starts (per image: from (seed, image index)) and AutoAttack (per block)
    beton: str | None = None  # FFCV file of the test split (tools/write_ffcv.py)


@dataclass
class PipelineConfig:
    finetune: list[str] = field(default_factory=lambda: ["slf"])  # modes run for every method
    baselines: list[str] = field(default_factory=lambda: ["simclr"])  # registered methods run beside train.method
    fpre_method: str = "simclr"  # pretrained as f_pre for the clustering stage when pseudo.fpre is null
    figures: bool = True  # summary.png, curves.png (rows with eval.curves) and tsne.png beside summary.md
    tsne_n: int = 2000  # t-SNE of the encoders' features on the first n test images; 0 = no t-SNE


@dataclass
class LaunchConfig:
    """Resources per stage for tools/submit.py; null = the command line's --nodes / --gpus-per-node."""

    pretrain_nodes: int | None = None
    cluster_nodes: int | None = None
    finetune_nodes: int | None = None
    evaluate_nodes: int | None = None


@dataclass
class Config:
    out_dir: str = "runs/${train.method}-${data.name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __reduce__(self):
        from .config import config_from_yaml, to_yaml

        return config_from_yaml, (to_yaml(self),)
