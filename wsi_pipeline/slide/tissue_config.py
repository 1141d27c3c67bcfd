"""Tissue detection settings (a light module: the configuration imports it without scikit-image)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wsi_pipeline.core.schema import StrictModel


class TissueConfig(StrictModel):
    """Tissue detection on a low-resolution thumbnail."""

    mask_mpp: float = Field(8.0, gt=0, le=64, description="µm/px of the tissue mask")
    background: Literal["auto", "light", "dark"] = Field(
        "auto",
        description="light = brightfield (H&E), dark = fluorescence; auto decides from the slide's border",
    )
    saturation_min: float = Field(0.05, ge=0, le=1, description="lower clamp of the Otsu saturation threshold")
    saturation_max: float = Field(0.15, ge=0, le=1, description="upper clamp of the Otsu saturation threshold")
    smooth_um: float = Field(4.0, ge=0, description="Gaussian sigma applied before thresholding")
    closing_um: float = Field(24.0, ge=0, description="radius of the morphological closing that joins fibres")
    min_region_um2: float = Field(20000.0, ge=0, description="tissue pieces smaller than this are dropped")
    max_hole_um2: float = Field(20000.0, ge=0, description="holes smaller than this are filled")
    pen_filter: bool = Field(True, description="reject green, blue, red and black ink")
    pen_margin_um: float = Field(40.0, ge=0, description="how far around ink the mask is cleared")
    pen_min_area_um2: float = Field(2000.0, ge=0, description="ink specks smaller than this are ignored")
    pen_max_fraction: float = Field(
        0.3, ge=0, le=1, description="a tissue piece made of more ink than this fraction is dropped whole"
    )
    dark_value: int = Field(60, ge=0, le=255, description="pixels darker than this (max channel) are artefacts")
    simplify_um: float = Field(2.0, ge=0, description="polygon simplification tolerance")

    @model_validator(mode="after")
    def _ordered(self) -> TissueConfig:
        if self.saturation_min > self.saturation_max:
            raise ValueError("saturation_min must not exceed saturation_max")
        return self
