from django import forms


class RefundForm(forms.Form):
    amount = forms.DecimalField(min_value=0, max_digits=8, decimal_places=2)
    reason = forms.CharField(max_length=200)
