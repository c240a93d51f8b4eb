from autoglm_phone.losses.contrastive import itc_loss

__all__ = ["itc_loss"]
