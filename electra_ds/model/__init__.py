"""ELECTRA towers, heads and Hugging Face interop."""
from electra_ds.model.classifier import ElectraClassifier
from electra_ds.model.electra import ElectraForPretraining, PretrainOutput
from electra_ds.model.hf import export_hf_pair, load_hf_pair, load_pretrained, save_model

__all__ = ["ElectraClassifier", "ElectraForPretraining", "PretrainOutput", "export_hf_pair", "load_hf_pair",
           "load_pretrained", "save_model"]
